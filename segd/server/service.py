"""The segmentation server's operations, between the HTTP handlers and the store.

One `Service` owns the store, the in-memory compiler and the publisher. A
change that can alter instructions (`Service.change()`) follows one path: write
it with its audit row as one writer of a group-committed store transaction, and
apply it to the compiler alongside, noting the hosts it may affect. Just before
the transaction commits, the hosts affected by all its writers are planned
(those whose content changed get their next version), and the new versions are
written in the same transaction; once it is durable they are published and
exactly those hosts woken. If a writer fails its compiler edits are undone; if
the commit fails, every writer's are, so the compiler always mirrors the
committed store, in the store's order.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import nacl.signing

from segd import crypto, log, wire
from segd.config import ServerConfig
from segd.errors import Forbidden, InvalidInput, NotFound, SegdError, Unauthorized
from segd.server import admintoken, tokens, validate
from segd.server.commit import Work
from segd.server.compiler import Compiler
from segd.server.guard import Guard
from segd.server.notify import Hub
from segd.server.publish import Plan, Publisher, Signing
from segd.server.refusals import clip
from segd.server.replay import ReplayMarks
from segd.server.store import Store, Tx

_log = log.get("segd.server")

SIGNING_KEY_FILE = "server.key"
DB_FILE = "segd.db"

Clock = Callable[[], float]


class HostAuth(msgspec.Struct, frozen=True):
    verify_key: nacl.signing.VerifyKey
    revoked: bool


def new_id(prefix: str, nbytes: int = 6) -> str:
    return f"{prefix}_{secrets.token_hex(nbytes)}"


sha256_hex = admintoken.sha256_hex


def _make_data_dir(data: Path) -> None:
    """The data dir, 0700. The signing key is made only once the store holds the
    dir's lock: never by a second server that is about to be refused."""
    data.mkdir(parents=True, exist_ok=True, mode=0o700)


class Change:
    """Compiler edits within a store write, each with its undo."""

    def __init__(self, svc: Service, tx: Tx) -> None:
        self._svc = svc
        self._tx = tx
        self.affected: set[str] = set()

    def add_workload(self, w: wire.Workload, previous: wire.Workload | None = None) -> None:
        """Add `w` (replacing `previous`, the same workload before this change)."""
        c = self._svc.compiler
        self.affected |= c.add_workload(w)
        self._tx.on_undo(lambda: c.add_workload(previous) if previous else c.remove_workload(w.id))

    def remove_workload(self, w: wire.Workload) -> None:
        c = self._svc.compiler
        self.affected |= c.remove_workload(w.id)
        self._tx.on_undo(lambda: c.add_workload(w))

    def set_rules(self, rules: list[wire.Rule], previous: list[wire.Rule]) -> None:
        c = self._svc.compiler
        self.affected |= c.set_rules(rules)
        self._tx.on_undo(lambda: c.set_rules(previous))

    def add_host(self, host_id: str) -> None:
        self._svc.pub.add_host(host_id)
        self.affected.add(host_id)
        self._tx.on_undo(lambda: self._svc.pub.drop_host(host_id))

    def drop_host(self, host_id: str) -> None:
        """Stop publishing to a host (its instructions are kept for an undo)."""
        saved = self._svc.pub.save_host(host_id)
        self._svc.pub.drop_host(host_id)
        self.affected.discard(host_id)
        self._tx.on_undo(lambda: self._svc.pub.restore_host(host_id, saved))

    def on_undo(self, fn: Callable[[], object]) -> None:
        self._tx.on_undo(fn)

    def will_read(self, host_id: str) -> None:
        """The answer carries the host's new instructions: have them signed on the
        commit thread, before the answer is due."""
        self._svc.awaited.add(host_id)


class Service:
    """The server core and its admin operations (agent ones are in `agents`)."""

    def __init__(
        self, cfg: ServerConfig, store: Store, key: nacl.signing.SigningKey, clock: Clock
    ) -> None:
        self.cfg = cfg
        self.dims = tuple(cfg.dimensions)
        self.data_dir = Path(cfg.data_dir)
        self.store = store
        self.clock = clock
        self.started_at = clock()
        self.marks = ReplayMarks(self.started_at, {})
        self.guard = Guard(cfg)
        self.signing_key = key
        self.hub = Hub()
        self.compiler = Compiler()
        self.pub = Publisher(key, self.compiler, self.hub)
        self.server_keys = {self.pub.key_id: key.verify_key}
        self.hosts: dict[str, HostAuth] = {}
        self.admin_hashes: set[str] = set()
        self.touched: dict[str, float] = {}  # host -> when last_seen was last written
        self.verified_tokens: dict[str, tokens.Claims] = {}  # pairing key text -> claims
        self._pending: set[str] = set()  # hosts the open transaction's changes may affect
        self.awaited: set[str] = set()  # of those, hosts whose answers carry instructions
        self._plan: Plan = {}  # what that transaction publishes once committed
        self._signing: Signing | None = None  # its instructions signed ahead
        store.hooks = self

    # ---- lifecycle ----------------------------------------------------------------

    @classmethod
    async def open(cls, cfg: ServerConfig, clock: Clock = time.time) -> Service:
        data = Path(cfg.data_dir)
        _make_data_dir(data)
        store = await Store.open(data / DB_FILE)  # takes the data dir's lock
        try:
            key = crypto.load_or_create_signing_key(data / SIGNING_KEY_FILE)
            svc = cls(cfg, store, key, clock)
            await svc._load()
        except BaseException:
            await store.close()
            raise
        return svc

    async def _load(self) -> None:
        workloads = await self.store.workloads()
        self.compiler = Compiler(await self.store.rules(), workloads)
        self.pub = Publisher(self.signing_key, self.compiler, self.hub)
        self.hosts = {
            h.id: HostAuth(crypto.verify_key_from_b64(h.public_key), h.revoked)
            for h in await self.store.hosts()
        }
        self.marks = ReplayMarks(self.started_at, await self.store.replay_marks())
        states = {
            h: s for h, s in (await self.store.host_digests()).items() if not self.hosts[h].revoked
        }
        stale = self.pub.load(states)
        if stale:
            async with self.store.write() as tx:
                tx.set_versions(self.pub.versions(stale))
            self.pub.commit(stale)
        self.admin_hashes = {await admintoken.ensure(self.store, self.data_dir, self.clock())}
        _log.info(
            "server.loaded",
            hosts=len(self.hosts),
            workloads=len(workloads),
            bumped=len(stale),
            key_id=self.pub.key_id,
        )

    async def rotate_admin_token(self) -> wire.AdminToken:
        """A new admin token; every other one is refused from now on."""
        h, answer = await admintoken.rotate(self.store, self.data_dir, self.clock())
        self.admin_hashes = {h}
        return answer

    async def persist_mark(self, host_id: str, ts: float) -> None:
        """Raise the host's replay mark to `ts`, durably."""
        async with self.store.write() as tx:
            tx.set_replay_mark(host_id, ts)
        self.marks.persisted(host_id, ts)

    async def close(self) -> None:
        self.hub.close()
        await self.store.close()

    # ---- shared core --------------------------------------------------------------

    def is_admin(self, token: str) -> bool:
        return sha256_hex(token) in self.admin_hashes

    def check_host(self, host_id: str) -> HostAuth:
        """The host's agent key; refuses unknown (401) and revoked (403) hosts."""
        auth = self.hosts.get(host_id)
        if auth is None:
            raise Unauthorized(f"unknown host {host_id[:64]!r}", code="unknown_host")
        if auth.revoked:
            raise Forbidden(f"host {host_id} has been revoked", code="host_revoked")
        return auth

    @contextlib.asynccontextmanager
    async def change(self) -> AsyncIterator[tuple[Tx, Change]]:
        """One policy change: a store write plus the compiler edits it implies.

        The edits are made inside the write, so the new instruction versions
        commit together with the change (one durable commit, shared with the
        other writers of the transaction); if the write does not commit, the
        edits are undone. Once committed, the changed hosts' instructions are
        published and their agents woken.
        """
        async with self.store.write() as tx:
            ch = Change(self, tx)
            yield tx, ch
            self._pending |= ch.affected

    # Store commit hooks: plan the transaction's hosts, publish them once durable.

    def before_commit(self, tx: Tx) -> Work | None:
        self._plan = self.pub.plan(self._pending)
        if self._plan:
            tx.set_versions(self.pub.versions(self._plan))
        self._signing = self.pub.sign_ahead(self._plan, self.awaited)
        self._pending, self.awaited = set(), set()
        return self._signing

    def after_commit(self) -> None:
        plan, self._plan = self._plan, {}
        signing, self._signing = self._signing, None
        self.pub.commit(plan, signing)
        if plan:
            _log.debug("instructions.published", hosts=sorted(plan))

    def after_abort(self) -> None:
        self._pending, self.awaited = set(), set()
        self._plan = {}
        self._signing = None

    # ---- rules --------------------------------------------------------------------

    async def add_rule(self, rin: wire.RuleIn) -> wire.Rule:
        rule = validate.rule(rin, self.dims, new_id("r"), self.clock())
        async with self.change() as (tx, ch):
            before = tx.rules()
            tx.insert_rule(rule)
            tx.audit(rule.created_at, "rule.added", "ok", detail=rule.id)
            ch.set_rules(tx.rules(), before)
        _log.info("rule.added", rule=rule.id, services=rule.services)
        return rule

    async def delete_rule(self, rule_id: str) -> None:
        async with self.change() as (tx, ch):
            before = tx.rules()
            if not tx.delete_rule(rule_id):
                raise NotFound(f"no rule {rule_id!r}")
            tx.audit(self.clock(), "rule.removed", "ok", detail=rule_id)
            ch.set_rules(tx.rules(), before)
        _log.info("rule.removed", rule=rule_id)

    # ---- profiles and keys --------------------------------------------------------

    async def add_profile(self, pin: wire.ProfileIn) -> wire.Profile:
        prof = validate.profile(pin, self.dims, new_id("p"), self.clock())
        async with self.store.write() as tx:
            if tx.profile_by_name(prof.name) is not None:
                raise SegdError(f"profile {prof.name!r} already exists", code="exists", status=409)
            tx.insert_profile(prof)
            tx.audit(prof.created_at, "profile.added", "ok", detail=prof.name)
        _log.info("profile.added", profile=prof.name, labels=prof.labels, locked=prof.locked)
        return prof

    async def delete_profile(self, name: str) -> int:
        """Delete a profile with its keys (which stop working); return how many keys."""
        async with self.store.write() as tx:
            prof = tx.profile_by_name(name)
            if prof is None:
                raise NotFound(f"no profile {name!r}")
            n = tx.delete_profile(prof.id)
            tx.audit(self.clock(), "profile.removed", "ok", detail=f"{name}: {n} keys")
        _log.info("profile.removed", profile=name, keys=n)
        return n

    async def revoke_profile(self, name: str, *, unpair: bool = False) -> list[wire.PairingKey]:
        """Revoke every key of the profile; with `unpair`, also unpair every
        workload they paired, on every host, in the same transaction."""
        now = self.clock()
        async with self.change() as (tx, ch):
            prof = tx.profile_by_name(name)
            if prof is None:
                raise NotFound(f"no profile {name!r}")
            n = tx.revoke_profile_keys(prof.id)
            gone = tx.workloads_of_profile(prof.id) if unpair else []
            self._unpair(tx, ch, gone, "profile_revoked", now)
            detail = f"{name}: {n} keys" + (f", {len(gone)} workloads unpaired" if unpair else "")
            tx.audit(now, "profile.revoked", "ok", detail=detail)
        _log.info("profile.revoked", profile=name, keys=n, unpaired=len(gone))
        return await self.store.keys(name)

    async def issue_key(self, kin: wire.KeyIssueIn) -> wire.KeyIssued:
        now = self.clock()
        async with self.store.write() as tx:
            prof = tx.profile_by_name(kin.profile)
            if prof is None:
                raise NotFound(f"no profile {kin.profile!r}")
            max_uses = (
                prof.max_uses
                if isinstance(kin.max_uses, msgspec.UnsetType)
                else validate.max_uses(kin.max_uses)
            )
            lifespan = prof.lifespan_s if kin.lifespan_s is None else kin.lifespan_s
            validate.bounded("lifespan_s", lifespan, 1, validate.MAX_LIFESPAN_S)
            validate.text("description", kin.description, validate.MAX_DESCRIPTION)
            iat = int(now)
            claims = tokens.Claims(
                v=tokens.VERSION,
                kid=new_id("k", 8),
                pid=prof.id,
                sk=self.pub.key_id,
                iat=iat,
                exp=iat + lifespan,
            )
            key = wire.PairingKey(
                key_id=claims.kid,
                profile=prof.name,
                max_uses=max_uses,
                uses=0,
                issued_at=now,
                expires_at=float(claims.exp),
                revoked=False,
                description=kin.description,
            )
            tx.insert_key(key, prof.id)
            tx.audit(now, "key.issued", "ok", key_id=key.key_id, detail=prof.name)
        _log.info("key.issued", key_id=key.key_id, profile=prof.name, max_uses=max_uses)
        return wire.KeyIssued(
            key_id=key.key_id,
            token=tokens.issue(self.signing_key, claims),
            expires_at=key.expires_at,
            max_uses=max_uses,
        )

    async def list_keys(self, profile: str | None) -> list[wire.PairingKey]:
        if profile is not None and await self.store.profile_by_name(profile) is None:
            raise NotFound(f"no profile {profile!r}")
        return await self.store.keys(profile)

    async def revoke_key(self, key_id: str, *, unpair: bool = False) -> wire.PairingKey:
        """Revoke a key; with `unpair`, also unpair every workload it paired, on
        every host, in the same transaction."""
        now = self.clock()
        async with self.change() as (tx, ch):
            if not tx.revoke_key(key_id):
                raise NotFound(f"no pairing key {key_id!r}")
            gone = tx.workloads_of_key(key_id) if unpair else []
            self._unpair(tx, ch, gone, "key_revoked", now)
            detail = f"{len(gone)} workloads unpaired" if unpair else ""
            tx.audit(now, "key.revoked", "ok", key_id=key_id, detail=detail)
        _log.info("key.revoked", key_id=key_id, unpaired=len(gone))
        key = await self.store.key(key_id)
        assert key is not None
        return key

    # ---- workloads ----------------------------------------------------------------

    async def unpair_workload(self, workload_id: str) -> None:
        """Unpair one workload, wherever it is; its container is held: pairing it
        again is refused (`unpaired_by_admin`) until it is recreated."""
        now = self.clock()
        async with self.change() as (tx, ch):
            w = tx.workload(workload_id)
            if w is None:
                raise NotFound(f"no workload {workload_id!r}")
            tx.hold(w, now)
            self._unpair(tx, ch, [w], "unpaired_by_admin", now)
        _log.info("workload.unpaired_by_admin", workload=w.id, host=w.host_id)

    @staticmethod
    def _unpair(tx: Tx, ch: Change, gone: list[wire.Workload], reason: str, now: float) -> None:
        """Remove workloads, each audited, from the store and every host's instructions."""
        for w in gone:
            tx.delete_workload(w.id)
            tx.audit(
                now,
                "workload.unpaired",
                "ok",
                reason,
                host_id=w.host_id,
                container_id=w.container_id,
                key_id=w.key_id,
                workload_id=w.id,
            )
            ch.remove_workload(w)

    # ---- hosts and activation codes -----------------------------------------------

    async def revoke_host(self, host_id: str) -> wire.Host:
        """Refuse the host's agent from now on and drop its workloads.

        A pairing of the host earlier in the open transaction is answered with the
        host's instructions once that commits: the revocation waits for it and
        comes in the next transaction. A pairing after it is refused unwritten."""
        now = self.clock()
        while True:
            async with self.change() as (tx, ch):
                deferred = host_id in self.awaited
                if not deferred:
                    gone = self._revoke_host(tx, ch, host_id, now)
            if not deferred:
                break
        _log.info("host.revoked", host=host_id, workloads=len(gone))
        host = await self.store.host(host_id)
        assert host is not None
        return host

    def _revoke_host(self, tx: Tx, ch: Change, host_id: str, now: float) -> list[wire.Workload]:
        if not tx.revoke_host(host_id):
            raise NotFound(f"no host {host_id!r}")
        gone = tx.workloads_of_host(host_id)
        self._unpair(tx, ch, gone, "host_revoked", now)
        tx.audit(now, "host.revoked", "ok", host_id=host_id)
        auth = self.hosts.get(host_id)
        if auth is not None:
            self.hosts[host_id] = HostAuth(auth.verify_key, True)
            ch.on_undo(lambda: self.hosts.__setitem__(host_id, auth))
        ch.drop_host(host_id)
        return gone

    async def new_activation_code(self, ain: wire.ActivationCodeIn) -> wire.ActivationCode:
        lifespan = validate.bounded("lifespan_s", ain.lifespan_s, 1, validate.MAX_CODE_LIFESPAN_S)
        code = "act_" + secrets.token_urlsafe(24)  # never starts with "-"
        now = self.clock()
        async with self.store.write() as tx:
            tx.insert_activation_code(sha256_hex(code), now, now + lifespan)
            tx.audit(now, "activation_code.issued", "ok")
        _log.info("activation_code.issued", lifespan_s=lifespan)
        return wire.ActivationCode(code=code, expires_at=now + lifespan)

    # ---- agents (registration; pairing is in agents.py) ----------------------------

    async def register(self, rin: wire.RegisterIn, source: str) -> wire.Registered:
        """Register an agent. A refusal is audited in full when it is the first from
        its source in a while; the others are summed up (`guard`)."""
        hostname = validate.hostname(rin.hostname)
        try:
            vk = crypto.verify_key_from_b64(rin.public_key)
        except InvalidInput as e:
            raise InvalidInput(f"public_key: {e.message}") from None
        host_id = new_id("h", 8)
        now = self.clock()
        failure: SegdError | None = None
        audited = False
        async with self.change() as (tx, ch):
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
                ch.add_host(host_id)
            if failure is None:
                tx.audit(now, "host.registered", "ok", host_id=host_id, detail=hostname)
            elif audited := self.guard.refusals.note(
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
        self.hosts[host_id] = HostAuth(vk, False)
        _log.info("host.registered", host=host_id, hostname=hostname)
        return wire.Registered(
            host_id=host_id,
            server_keys={kid: crypto.b64e(bytes(k)) for kid, k in self.server_keys.items()},
        )
