"""Agent operations: register, pair and unpair workloads, hand out instructions, reports.

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
transaction is durable and applied: it names the workload, its labels and the
host's instructions version after the pairing; the agent's long-poll, woken by
the same commit, brings those instructions.

The verified pairing tokens and when each host was last seen are this
module's own state.
"""

from __future__ import annotations

import re

import msgspec

from segd import crypto, log, wire
from segd.errors import Forbidden, InvalidInput, SegdError, Unauthorized
from segd.server import mesh, pairing, tokens, validate
from segd.server.core import Core, new_id, sha256_hex
from segd.server.refusals import clip
from segd.server.store import Tx

_log = log.get("segd.server.agents")
_KEY_ID_RE = re.compile(r"^k_[0-9a-f]{16}\Z")
TOUCH_INTERVAL_S = 60.0
VERIFIED_TOKENS_MAX = 4096


def _claimed_key_id(token: str) -> str:
    """The key id a token claims, for the audit of a refusal (never trusted)."""
    try:
        kid = tokens.parse(token)[0].kid
    except tokens.TokenError:
        return ""
    return kid if _KEY_ID_RE.match(kid) else ""


def _check_live(tx: Tx, host_id: str) -> None:
    """Refuse a host revoked earlier in this transaction, or committed since the
    request was authenticated."""
    if tx.host_revoked(host_id) is not False:
        raise Forbidden(f"host {host_id} has been revoked", code="host_revoked")


class Agents:
    def __init__(self, core: Core) -> None:
        self._core = core
        self._verified: dict[str, tokens.Claims] = {}  # pairing key text -> claims
        self._touched: dict[str, float] = {}  # host -> when last_seen was last written

    # ---- registration -------------------------------------------------------------

    async def register(self, rin: wire.RegisterIn, source: str) -> wire.Registered:
        """Register an agent. A refusal is audited in full when it is the first from
        its source in a while; the others are summed up (`guard`)."""
        core = self._core
        hostname = validate.hostname(rin.hostname)
        try:
            crypto.verify_key_from_b64(rin.public_key)
        except InvalidInput as e:
            raise InvalidInput(f"public_key: {e.message}") from None
        host_id = new_id("h", 8)
        now = core.clock()
        failure: SegdError | None = None
        audited = False
        async with core.store.write() as tx:
            if tx.host_with_key(rin.public_key) is not None:
                failure = SegdError(
                    "this public key is already registered", code="public_key_in_use", status=409
                )
            elif not tx.consume_activation_code(sha256_hex(rin.activation_code), now, host_id):
                failure = Unauthorized(
                    "activation code is unknown, used or expired", code="invalid_activation_code"
                )
            else:
                tx.insert_host(host_id, hostname, rin.public_key, now)
            if failure is None:
                tx.audit(now, "host.registered", "ok", host_id=host_id, detail=hostname)
            elif audited := core.guard.refusals.note(
                source, failure.code, f"hostname {hostname}", now, audit=True
            ):
                tx.audit(now, "host.registered", "denied", failure.code, detail=clip(hostname))
        if failure is not None:
            if audited:
                _log.warning(
                    "host.register_refused",
                    hostname=clip(hostname),
                    source=source,
                    reason=failure.code,
                )
            raise failure
        _log.info("host.registered", host=host_id, hostname=hostname)
        return wire.Registered(
            host_id=host_id,
            server_keys={kid: crypto.b64e(bytes(k)) for kid, k in core.server_keys.items()},
        )

    # ---- pairing ------------------------------------------------------------------

    def _verify_token(self, token: str) -> tokens.Claims | tokens.TokenError:
        """The token's claims once its signature verified, or why it is refused (its
        expiry is judged with the pairing). A verified token is remembered by its
        exact text (one key pairs many containers)."""
        claims = self._verified.get(token)
        if claims is None:
            try:
                claims = tokens.verify_signature(token, self._core.server_keys)
            except tokens.TokenError as e:
                return e
            if len(self._verified) >= VERIFIED_TOKENS_MAX:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = claims
        return claims

    async def pair(self, host_id: str, pin: wire.PairIn) -> wire.PairResult:
        """Pair a container: the workload, its labels and the host's instructions
        version once the pairing is durable."""
        core = self._core
        pin = validate.pair_in(pin)
        now = core.clock()
        verified = self._verify_token(pin.pairing_key)
        failure: SegdError | None = None
        async with core.store.write() as tx:
            _check_live(tx, host_id)
            old = tx.workload_by_container(host_id, pin.container_id)
            w: wire.Workload | None = old
            if old is not None:
                w, failure = _pair_again(tx, old, pin, verified, now)
            else:
                try:
                    w = _new(core, tx, host_id, pin, verified, now)
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
        # 0 when the host was revoked in the same commit: its next request hears so.
        return wire.PairResult(workload_id=w.id, labels=w.labels, version=core.pub.version(host_id))

    async def unpair(self, host_id: str, uin: wire.UnpairIn) -> None:
        """Forget the container's workload (if any); its peers follow the commit."""
        cid = validate.container_id(uin.container_id)
        async with self._core.store.write() as tx:
            _check_live(tx, host_id)
            w = tx.workload_by_container(host_id, cid)
            if w is not None:
                tx.delete_workload(w.id)
            tx.audit(
                self._core.clock(),
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

    # ---- instructions, sidecars, reports ------------------------------------------

    async def instructions(self, host_id: str, since: int, wait_s: float) -> bytes | None:
        """The host's signed instructions (the JSON of a `wire.SignedInstructions`) once
        their version is above `since`, else None."""
        return await self._core.pub.newer(host_id, since, wait_s)

    async def sidecars(self, host_id: str, sin: wire.SidecarsIn) -> None:
        """Record the host's sidecars as its agent sees them now (for `workload list`).
        They are not workloads and change no instructions: the table of the namespace
        they are in is its owner's."""
        items = validate.sidecars(sin)
        async with self._core.store.write() as tx:
            tx.set_sidecars(host_id, items)
        _log.info("host.sidecars", host=host_id, sidecars=len(items))

    async def report(self, host_id: str, rep: wire.AgentReport) -> None:
        rep = validate.report(rep)
        async with self._core.store.write() as tx:
            tx.audit(
                self._core.clock(),
                f"agent.{rep.event}",
                "reported",
                host_id=host_id,
                container_id=rep.container_id,
                detail=rep.detail,
            )
        _log.warning("agent.reported", host=host_id, kind=rep.event, container=rep.container_id)

    async def join_mesh(self, host_id: str, jin: wire.MeshJoinIn) -> wire.MeshJoined:
        """Give the host its subnet of the pool (the one it has when it joined
        before) and record its WireGuard key and endpoint; the hosts it exchanges
        traffic with learn them with the commit."""
        core = self._core
        pool = core.pool
        if not pool.enabled:
            raise SegdError(
                "the server has no mesh: set [server.mesh] pool",
                code="mesh_not_configured",
                status=409,
            )
        key = mesh.public_key(jin.public_key)
        endpoint = mesh.endpoint(jin.endpoint)
        now = core.clock()
        async with core.store.write() as tx:
            _check_live(tx, host_id)
            holder = tx.mesh_key_holder(key)
            if holder is not None and holder != host_id:
                raise SegdError(
                    "this WireGuard public key is another host's",
                    code="mesh_key_in_use",
                    status=409,
                )
            old = tx.host_mesh(host_id)
            subnet = old.subnet if old is not None and pool.holds(old.subnet) else None
            if subnet is None:
                subnet = pool.allocate(tx.mesh_subnets())
            if subnet is None:
                raise SegdError(
                    f"the mesh pool {pool.text} has no free /{pool.host_prefix} left",
                    code="mesh_pool_exhausted",
                    status=409,
                )
            peer = wire.MeshPeer(host_id=host_id, public_key=key, endpoint=endpoint, subnet=subnet)
            if peer != old:
                tx.join_mesh(peer)
                tx.audit(
                    now, "host.mesh_joined", "ok", host_id=host_id, detail=f"{subnet} {endpoint}"
                )
        _log.info("host.mesh_joined", host=host_id, subnet=subnet, endpoint=endpoint)
        return wire.MeshJoined(subnet=subnet, pool=pool.text)

    async def touch(self, host_id: str) -> None:
        """Record that the host's agent was seen (at most once a minute; best effort)."""
        now = self._core.clock()
        if now - self._touched.get(host_id, 0.0) < TOUCH_INTERVAL_S:
            return
        self._touched[host_id] = now
        try:
            async with self._core.store.write() as tx:
                tx.touch_host(host_id, now)
        except SegdError as e:
            _log.warning("host.touch_failed", host=host_id, error=e.message)


NOT_IN_SUBNET = "address_not_in_host_subnet"


def _check_mesh_addresses(tx: Tx, host_id: str, ips: list[str]) -> None:
    """Refuse a mesh address (inside the pool) outside the host's own subnet: a
    host pairs mesh addresses of its own subnet only."""
    mesh_ips = [ip for ip in ips if tx.scope_of(host_id, ip) == mesh.MESH_SCOPE]
    if not mesh_ips:
        return
    own = tx.host_mesh(host_id)
    for ip in sorted(mesh_ips):
        if own is None or not mesh.in_subnet(ip, own.subnet):
            where = f"its subnet {own.subnet}" if own else "no subnet: it has not joined the mesh"
            raise pairing.Denied(
                NOT_IN_SUBNET, f"address {ip} is in the mesh pool but the host has {where}"
            )


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


def _pair_again(
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
    try:
        _check_mesh_addresses(tx, w.host_id, pin.ips)
    except pairing.Denied as e:
        tx.audit(now, "workload.readdressed", "denied", e.code, detail=e.message, **audit)
        return w, e
    held = {ip: o for ip, o in (tx.ip_holders(w.host_id, pin.ips)).items() if o != w.id}
    if held:
        err = pairing.Denied(pairing.IP_IN_USE, f"address {min(held)} is held by another workload")
        tx.audit(now, "workload.readdressed", "denied", err.code, detail=err.message, **audit)
        return w, err
    moved = msgspec.structs.replace(w, ips=pin.ips)
    tx.readdress_workload(moved)
    tx.audit(now, "workload.readdressed", "ok", detail=",".join(pin.ips), **audit)
    _log.info("workload.readdressed", workload=w.id, ips=pin.ips)
    return moved, None


def _new(
    core: Core,
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
        claims, key, prof, pin.requested_labels, core.dims, now, readmit=readmit
    )
    _check_mesh_addresses(tx, host_id, pin.ips)
    held = tx.ip_holders(host_id, pin.ips)
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
