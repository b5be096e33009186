"""Agent operations: pair and unpair workloads, hand out instructions, take reports.

Pairing is idempotent per (host, container): asking again returns the workload
already recorded, without checking the key again or consuming a use (a key may
have expired since, the container has not changed). The token's signature is
checked before the write (it needs no store); a new pairing is then decided by
the pure `pairing` module on rows read inside the write; the use is counted,
the workload and its addresses recorded and the attempt audited in that one
write. A refusal commits only its audit row. The answer goes out once the
write's transaction is durable.
"""

from __future__ import annotations

import re

import msgspec

from segd import log, wire
from segd.errors import SegdError
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


def _verify_token(svc: Service, token: str, now: float) -> tokens.Claims | tokens.TokenError:
    """The token's claims, or why it is refused. A token whose signature verified
    is remembered by its exact text (one key pairs many containers); its expiry
    is checked every time."""
    claims = svc.verified_tokens.get(token)
    if claims is None:
        try:
            claims = tokens.verify(token, svc.server_keys, now)
        except tokens.TokenError as e:
            return e
        if len(svc.verified_tokens) >= VERIFIED_TOKENS_MAX:
            del svc.verified_tokens[next(iter(svc.verified_tokens))]
        svc.verified_tokens[token] = claims
    elif now >= claims.exp:
        return tokens.TokenError(tokens.EXPIRED, "pairing key has expired")
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
    verified = _verify_token(svc, pin.pairing_key, now)
    failure: SegdError | None = None
    async with svc.change() as (tx, ch):
        svc.check_host(host_id)
        old = tx.workload_by_container(host_id, pin.container_id)
        w: wire.Workload | None = old
        if old is not None:
            w, failure = _repair(tx, old, pin, now)
            if w is not old:
                ch.add_workload(w, previous=old)
                ch.will_read(host_id)
        else:
            try:
                if isinstance(verified, tokens.TokenError):
                    raise verified
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
    assert signed is not None
    return pair_result_json(w, signed)


def _repair(
    tx: Tx, w: wire.Workload, pin: wire.PairIn, now: float
) -> tuple[wire.Workload, SegdError | None]:
    """Pairing an already paired container: the same workload (a new object only
    when its addresses changed), or the reason new addresses were refused."""
    audit = {"host_id": w.host_id, "container_id": w.container_id, "workload_id": w.id}
    if w.ips == pin.ips:
        tx.audit(now, "workload.paired", "ok", "already_paired", key_id=w.key_id, **audit)
        return w, None
    held = {ip: o for ip, o in (tx.ip_holders(pin.ips)).items() if o != w.id}
    if held:
        e = pairing.Denied(pairing.IP_IN_USE, f"address {min(held)} is held by another workload")
        tx.audit(now, "workload.readdressed", "denied", e.code, detail=e.message, **audit)
        return w, e
    tx.set_workload_ips(w.id, pin.ips)
    tx.audit(now, "workload.readdressed", "ok", detail=",".join(pin.ips), **audit)
    _log.info("workload.readdressed", workload=w.id, ips=pin.ips)
    return msgspec.structs.replace(w, ips=pin.ips), None


def _new(
    svc: Service, tx: Tx, host_id: str, pin: wire.PairIn, claims: tokens.Claims, now: float
) -> wire.Workload:
    """Decide and record a new pairing; raises `Denied` having written nothing."""
    found = tx.key_with_profile(claims.kid)
    key, prof = found if found else (None, None)
    decision = pairing.decide(claims, key, prof, pin.requested_labels, svc.dims, now)
    held = tx.ip_holders(pin.ips)
    if held:
        raise pairing.Denied(pairing.IP_IN_USE, f"address {min(held)} is held by another workload")
    if not tx.consume_use(claims.kid, now):
        raise pairing.Denied(pairing.EXHAUSTED, f"pairing key {claims.kid} has no uses left")
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
