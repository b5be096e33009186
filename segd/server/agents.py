"""Agent operations: pair and unpair workloads, hand out instructions, take reports.

A pairing names a container and presents its pairing key. The token's signature
is checked before the write (it needs no store); the key is then judged by the
pure `pairing` module on rows read inside the write:

* a container with no workload pairs as new: the key must be live (known, not
  revoked, not expired, uses left, profile enabled); the use is counted and the
  container recorded as admitted by that key, with the workload, in that one
  write. A container the same key admitted before (it restarted: the agent
  unpairs on `die` and pairs on `start`) pairs again without a use, even once
  the key has expired or run out of uses; a revoked key or a deleted profile
  still refuses it, and a container an admin unpaired never pairs again.
* a container that still has its workload pairs again idempotently (with new
  addresses when they changed) only with the same key id, still known and not
  revoked; nothing is consumed.

A refusal commits only its audit row. The answer goes out once the write's
transaction is durable.
"""

from __future__ import annotations

import re

import msgspec

from segd import log, wire
from segd.errors import SegdError, Unavailable
from segd.server import pairing, tokens, validate
from segd.server.service import Service, new_id
from segd.server.store import Tx

_log = log.get("segd.server.agents")
_KEY_ID_RE = re.compile(r"^k_[0-9a-f]{16}\Z")
TOUCH_INTERVAL_S = 60.0
VERIFIED_TOKENS_MAX = 4096
_JSON = msgspec.json.Encoder()


def _claimed_key_id(token: str) -> str:
    """The key id a token claims, for the audit of a refusal (never trusted)."""
    try:
        kid = tokens.parse(token)[0].kid
    except tokens.TokenError:
        return ""
    return kid if _KEY_ID_RE.match(kid) else ""


def _verify_token(svc: Service, token: str) -> tokens.Claims | tokens.TokenError:
    """The token's claims once its signature verified, or why it is refused (its
    expiry is judged with the pairing). A verified token is remembered by its
    exact text (one key pairs many containers)."""
    claims = svc.verified_tokens.get(token)
    if claims is None:
        try:
            claims = tokens.verify_signature(token, svc.server_keys)
        except tokens.TokenError as e:
            return e
        if len(svc.verified_tokens) >= VERIFIED_TOKENS_MAX:
            del svc.verified_tokens[next(iter(svc.verified_tokens))]
        svc.verified_tokens[token] = claims
    return claims


def pair_result_json(w: wire.Workload, signed: bytes) -> bytes:
    """A `wire.PairResult` as JSON, around the host's instructions already signed
    and encoded (they are shared by every reader of that version)."""
    return b'{"workload_id":%b,"labels":%b,"instructions":%b}' % (
        _JSON.encode(w.id),
        _JSON.encode(w.labels),
        signed,
    )


async def pair(svc: Service, host_id: str, pin: wire.PairIn) -> bytes:
    """Pair a container; the answer is the JSON of a `wire.PairResult`."""
    pin = validate.pair_in(pin)
    now = svc.clock()
    verified = _verify_token(svc, pin.pairing_key)
    failure: SegdError | None = None
    async with svc.change() as (tx, ch):
        svc.check_host(host_id)
        old = tx.workload_by_container(host_id, pin.container_id)
        w: wire.Workload | None = old
        if old is not None:
            w, failure = _repair(tx, old, pin, verified, now)
            if w is not old:
                ch.add_workload(w, previous=old)
                ch.will_read(host_id)
        else:
            try:
                w = _new(svc, tx, host_id, pin, verified, now)
                ch.add_workload(w)
                ch.will_read(host_id)
            except (pairing.Denied, tokens.TokenError) as e:
                failure = e
                tx.audit(
                    now,
                    "workload.paired",
                    "denied",
                    e.code,
                    host_id=host_id,
                    container_id=pin.container_id,
                    key_id=_claimed_key_id(pin.pairing_key),
                    detail=e.message,
                )
    if failure is not None or w is None:
        reason = failure.code if failure else ""
        _log.info("workload.denied", host=host_id, container=pin.container_id, reason=reason)
        raise failure or SegdError("pairing failed")
    signed = svc.pub.signed(host_id)
    if signed is None:  # not published to: revoked since (`Service.revoke_host` waits
        svc.check_host(host_id)  # for the answers of its own transaction's pairings)
        raise Unavailable(f"no instructions for host {host_id}")
    return pair_result_json(w, signed)


def _check_workload_key(
    tx: Tx, w: wire.Workload, verified: tokens.Claims | tokens.TokenError, now: float
) -> None:
    """Refuse the key presented for an already paired container unless it is the
    workload's own key, verified, known and not revoked (expiry and uses aside)."""
    if isinstance(verified, tokens.TokenError):
        raise verified
    if verified.kid != w.key_id:
        raise pairing.Denied(
            pairing.KEY_MISMATCH,
            f"container {w.container_id} is paired with key {w.key_id}, not {verified.kid}",
        )
    found = tx.key_with_profile(verified.kid)
    key, prof = found if found else (None, None)
    pairing.check_key(verified, key, prof, now, readmit=True)


def _repair(
    tx: Tx,
    w: wire.Workload,
    pin: wire.PairIn,
    verified: tokens.Claims | tokens.TokenError,
    now: float,
) -> tuple[wire.Workload, SegdError | None]:
    """Pairing an already paired container: the same workload (a new object only
    when its addresses changed), or why its key or new addresses were refused
    (the workload is left as it was)."""
    audit = {"host_id": w.host_id, "container_id": w.container_id, "workload_id": w.id}
    try:
        _check_workload_key(tx, w, verified, now)
    except (pairing.Denied, tokens.TokenError) as e:
        key_id = _claimed_key_id(pin.pairing_key)
        tx.audit(now, "workload.paired", "denied", e.code, key_id=key_id, detail=e.message, **audit)
        return w, e
    if w.ips == pin.ips:
        tx.audit(now, "workload.paired", "ok", "already_paired", key_id=w.key_id, **audit)
        return w, None
    held = {ip: o for ip, o in (tx.ip_holders(pin.ips)).items() if o != w.id}
    if held:
        err = pairing.Denied(pairing.IP_IN_USE, f"address {min(held)} is held by another workload")
        tx.audit(now, "workload.readdressed", "denied", err.code, detail=err.message, **audit)
        return w, err
    tx.set_workload_ips(w.id, pin.ips)
    tx.audit(now, "workload.readdressed", "ok", detail=",".join(pin.ips), **audit)
    _log.info("workload.readdressed", workload=w.id, ips=pin.ips)
    return msgspec.structs.replace(w, ips=pin.ips), None


def _new(
    svc: Service,
    tx: Tx,
    host_id: str,
    pin: wire.PairIn,
    verified: tokens.Claims | tokens.TokenError,
    now: float,
) -> wire.Workload:
    """Decide and record a new pairing (or the re-admission of a container the key
    admitted before); raises `Denied` or `TokenError` having written nothing."""
    if isinstance(verified, tokens.TokenError):
        raise verified
    claims = verified
    if tx.held(host_id, pin.container_id):
        raise pairing.Denied(
            pairing.HELD,
            f"container {pin.container_id} was unpaired by an admin; only a new container pairs",
        )
    readmit = tx.admitted(host_id, pin.container_id, claims.kid)
    if not readmit:
        tokens.check_expiry(claims, now)
    found = tx.key_with_profile(claims.kid)
    key, prof = found if found else (None, None)
    decision = pairing.decide(
        claims, key, prof, pin.requested_labels, svc.dims, now, readmit=readmit
    )
    held = tx.ip_holders(pin.ips)
    if held:
        raise pairing.Denied(pairing.IP_IN_USE, f"address {min(held)} is held by another workload")
    if not readmit:
        if not tx.consume_use(claims.kid, now):
            raise pairing.Denied(pairing.EXHAUSTED, f"pairing key {claims.kid} has no uses left")
        tx.admit(host_id, pin.container_id, claims.kid, now)
    w = wire.Workload(
        id=new_id("w", 8),
        host_id=host_id,
        container_id=pin.container_id,
        name=pin.name,
        labels=decision.labels,
        ips=pin.ips,
        key_id=claims.kid,
        paired_at=now,
    )
    tx.insert_workload(w)
    reason = "profile_labels_applied" if decision.defaulted else ""
    reason = "readmitted" if readmit else reason
    tx.audit(
        now,
        "workload.paired",
        "ok",
        reason,
        host_id=host_id,
        container_id=w.container_id,
        key_id=w.key_id,
        workload_id=w.id,
    )
    _log.info(
        "workload.paired",
        host=host_id,
        container=w.container_id,
        workload=w.id,
        labels=w.labels,
        key_id=w.key_id,
        defaulted=decision.defaulted,
        readmitted=readmit,
    )
    return w


async def unpair(svc: Service, host_id: str, uin: wire.UnpairIn) -> None:
    """Forget the container's workload (if any) and update its peers."""
    cid = validate.container_id(uin.container_id)
    async with svc.change() as (tx, ch):
        svc.check_host(host_id)
        w = tx.workload_by_container(host_id, cid)
        if w is not None:
            tx.delete_workload(w.id)
            ch.remove_workload(w)
        tx.audit(
            svc.clock(),
            "workload.unpaired",
            "ok",
            "" if w else "not_paired",
            host_id=host_id,
            container_id=cid,
            workload_id=w.id if w else "",
            key_id=w.key_id if w else "",
        )
    if w is not None:
        _log.info("workload.unpaired", host=host_id, container=cid, workload=w.id)


async def instructions(svc: Service, host_id: str, since: int, wait_s: float) -> bytes | None:
    """The host's signed instructions (the JSON of a `wire.SignedInstructions`) once
    their version is above `since`, else None."""
    if svc.pub.version(host_id) <= since and wait_s > 0:
        await svc.hub.wait_newer(host_id, since, wait_s)
    if svc.pub.version(host_id) <= since:
        return None
    return svc.pub.signed(host_id)


async def sidecars(svc: Service, host_id: str, sin: wire.SidecarsIn) -> None:
    """Record the host's sidecars as its agent sees them now (for `workload list`).
    They are not workloads and change no instructions: the table of the namespace
    they are in is its owner's."""
    items = validate.sidecars(sin)
    async with svc.store.write() as tx:
        tx.set_sidecars(host_id, items)
    _log.info("host.sidecars", host=host_id, sidecars=len(items))


async def report(svc: Service, host_id: str, rep: wire.AgentReport) -> None:
    rep = validate.report(rep)
    async with svc.store.write() as tx:
        tx.audit(
            svc.clock(),
            f"agent.{rep.event}",
            "reported",
            host_id=host_id,
            container_id=rep.container_id,
            detail=rep.detail,
        )
    _log.warning("agent.reported", host=host_id, kind=rep.event, container=rep.container_id)


async def touch(svc: Service, host_id: str) -> None:
    """Record that the host's agent was seen (at most once a minute; best effort)."""
    now = svc.clock()
    if now - svc.touched.get(host_id, 0.0) < TOUCH_INTERVAL_S:
        return
    svc.touched[host_id] = now
    try:
        async with svc.store.write() as tx:
            tx.touch_host(host_id, now)
    except SegdError as e:
        _log.warning("host.touch_failed", host=host_id, error=e.message)
