"""Admin operations: rules, profiles, keys, workloads, hosts, activation codes, the token.

Each is one store write (with its audit row) that returns once durable; what
it changes in the compiled instructions reaches the compiler and the agents
through the core once committed (`Core.apply`). The admin token's hash is the
only state of its own.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import msgspec

from segd import log, wire
from segd.errors import NotFound, SegdError
from segd.server import admintoken, tokens, validate
from segd.server.core import Core, new_id, sha256_hex
from segd.server.store import Tx

_log = log.get("segd.server")


class Admin:
    def __init__(self, core: Core, data_dir: Path) -> None:
        self._core = core
        self._data_dir = data_dir
        self._hashes: set[str] = set()  # of the one valid admin token

    async def load(self) -> None:
        self._hashes = {
            await admintoken.ensure(self._core.store, self._data_dir, self._core.clock())
        }

    def is_admin(self, token: str) -> bool:
        return sha256_hex(token) in self._hashes

    async def rotate_admin_token(self) -> wire.AdminToken:
        """A new admin token; every other one is refused from now on."""
        h, answer = await admintoken.rotate(self._core.store, self._data_dir, self._core.clock())
        self._hashes = {h}
        return answer

    # ---- rules --------------------------------------------------------------------

    async def add_rule(self, rin: wire.RuleIn) -> wire.Rule:
        rule = validate.rule(rin, self._core.dims, new_id("r"), self._core.clock())
        async with self._core.store.write() as tx:
            tx.insert_rule(rule)
            tx.audit(rule.created_at, "rule.added", "ok", detail=rule.id)
        _log.info("rule.added", rule=rule.id, services=rule.services)
        return rule

    async def delete_rule(self, rule_id: str) -> None:
        async with self._core.store.write() as tx:
            if not tx.delete_rule(rule_id):
                raise NotFound(f"no rule {rule_id!r}")
            tx.audit(self._core.clock(), "rule.removed", "ok", detail=rule_id)
        _log.info("rule.removed", rule=rule_id)

    # ---- profiles and keys --------------------------------------------------------

    async def add_profile(self, pin: wire.ProfileIn) -> wire.Profile:
        prof = validate.profile(pin, self._core.dims, new_id("p"), self._core.clock())
        async with self._core.store.write() as tx:
            if tx.profile_by_name(prof.name) is not None:
                raise SegdError(f"profile {prof.name!r} already exists", code="exists", status=409)
            tx.insert_profile(prof)
            tx.audit(prof.created_at, "profile.added", "ok", detail=prof.name)
        _log.info("profile.added", profile=prof.name, labels=prof.labels, locked=prof.locked)
        return prof

    async def delete_profile(self, name: str) -> int:
        """Delete a profile with its keys (which stop working); return how many keys."""
        async with self._core.store.write() as tx:
            prof = tx.profile_by_name(name)
            if prof is None:
                raise NotFound(f"no profile {name!r}")
            n = tx.delete_profile(prof.id)
            tx.audit(self._core.clock(), "profile.removed", "ok", detail=f"{name}: {n} keys")
        _log.info("profile.removed", profile=name, keys=n)
        return n

    async def revoke_profile(self, name: str, *, unpair: bool = False) -> list[wire.PairingKey]:
        """Revoke every key of the profile; with `unpair`, also unpair every
        workload they paired, on every host, in the same transaction."""
        now = self._core.clock()
        async with self._core.store.write() as tx:
            prof = tx.profile_by_name(name)
            if prof is None:
                raise NotFound(f"no profile {name!r}")
            n = tx.revoke_profile_keys(prof.id)
            gone = tx.workloads_of_profile(prof.id) if unpair else []
            _unpair(tx, gone, "profile_revoked", now)
            detail = f"{name}: {n} keys" + (f", {len(gone)} workloads unpaired" if unpair else "")
            tx.audit(now, "profile.revoked", "ok", detail=detail)
        _log.info("profile.revoked", profile=name, keys=n, unpaired=len(gone))
        return await self._core.store.keys(name)

    async def issue_key(self, kin: wire.KeyIssueIn) -> wire.KeyIssued:
        now = self._core.clock()
        async with self._core.store.write() as tx:
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
                sk=self._core.pub.key_id,
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
            token=tokens.issue(self._core.signing_key, claims),
            expires_at=key.expires_at,
            max_uses=max_uses,
        )

    async def list_keys(self, profile: str | None) -> list[wire.PairingKey]:
        store = self._core.store
        if profile is not None and await store.profile_by_name(profile) is None:
            raise NotFound(f"no profile {profile!r}")
        return await store.keys(profile)

    async def revoke_key(self, key_id: str, *, unpair: bool = False) -> wire.PairingKey:
        """Revoke a key; with `unpair`, also unpair every workload it paired, on
        every host, in the same transaction."""
        now = self._core.clock()
        async with self._core.store.write() as tx:
            if not tx.revoke_key(key_id):
                raise NotFound(f"no pairing key {key_id!r}")
            gone = tx.workloads_of_key(key_id) if unpair else []
            _unpair(tx, gone, "key_revoked", now)
            detail = f"{len(gone)} workloads unpaired" if unpair else ""
            tx.audit(now, "key.revoked", "ok", key_id=key_id, detail=detail)
        _log.info("key.revoked", key_id=key_id, unpaired=len(gone))
        key = await self._core.store.key(key_id)
        assert key is not None
        return key

    # ---- workloads ----------------------------------------------------------------

    async def unpair_workload(self, workload_id: str) -> None:
        """Unpair one workload, wherever it is; its container is held: pairing it
        again is refused (`unpaired_by_admin`) until it is recreated."""
        now = self._core.clock()
        async with self._core.store.write() as tx:
            w = tx.workload(workload_id)
            if w is None:
                raise NotFound(f"no workload {workload_id!r}")
            tx.hold(w, now)
            _unpair(tx, [w], "unpaired_by_admin", now)
        _log.info("workload.unpaired_by_admin", workload=w.id, host=w.host_id)

    # ---- hosts and activation codes -----------------------------------------------

    async def list_hosts(self) -> list[wire.Host]:
        """The hosts, each with the version its agent is served now (the store
        has it once the next transaction commits)."""
        pub = self._core.pub
        return [
            h if h.revoked else msgspec.structs.replace(h, instructions_version=pub.version(h.id))
            for h in await self._core.store.hosts()
        ]

    async def revoke_host(self, host_id: str) -> wire.Host:
        """Refuse the host's agent from now on and drop its workloads. A pairing of
        the host later in the same transaction is refused unwritten (it reads the
        revocation); one earlier is unpaired with the rest."""
        now = self._core.clock()
        async with self._core.store.write() as tx:
            if not tx.revoke_host(host_id):
                raise NotFound(f"no host {host_id!r}")
            gone = tx.workloads_of_host(host_id)
            _unpair(tx, gone, "host_revoked", now)
            tx.audit(now, "host.revoked", "ok", host_id=host_id)
        _log.info("host.revoked", host=host_id, workloads=len(gone))
        host = await self._core.store.host(host_id)
        assert host is not None
        return host

    async def new_activation_code(self, ain: wire.ActivationCodeIn) -> wire.ActivationCode:
        lifespan = validate.bounded("lifespan_s", ain.lifespan_s, 1, validate.MAX_CODE_LIFESPAN_S)
        code = "act_" + secrets.token_urlsafe(24)  # never starts with "-"
        now = self._core.clock()
        async with self._core.store.write() as tx:
            tx.insert_activation_code(sha256_hex(code), now, now + lifespan)
            tx.audit(now, "activation_code.issued", "ok")
        _log.info("activation_code.issued", lifespan_s=lifespan)
        return wire.ActivationCode(code=code, expires_at=now + lifespan)


def _unpair(tx: Tx, gone: list[wire.Workload], reason: str, now: float) -> None:
    """Remove workloads, each audited (every host's instructions follow the commit)."""
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
