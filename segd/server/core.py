"""The server core: the store, the compiler and the publisher, kept in step.

Every operation writes through the store; nothing in memory changes before the
store has committed. Once a transaction is durable the store hands its change
records to `Core.apply` (in commit order, before any of its writers is
answered), which applies them to the pure compiler and to the hosts' agent
keys, then has the publisher give the commit's generation to the hosts whose
content changed and wake exactly those. The admin operations (`admin`) and
the agent operations (`agents`) are built over this core.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import msgspec
import nacl.signing

from segd import crypto, log
from segd.config import ServerConfig
from segd.errors import Forbidden, Unauthorized
from segd.server import admintoken, mesh
from segd.server.changes import (
    Commit,
    HostAdded,
    HostMeshJoined,
    HostRevoked,
    HostsRecompiled,
    RulesSet,
    WorkloadAdded,
    WorkloadReaddressed,
    WorkloadRemoved,
)
from segd.server.compiler import Compiler
from segd.server.guard import Guard
from segd.server.publish import Publisher
from segd.server.replay import ReplayMarks
from segd.server.store import Store

_log = log.get("segd.server")

Clock = Callable[[], float]
sha256_hex = admintoken.sha256_hex


class HostAuth(msgspec.Struct, frozen=True):
    verify_key: nacl.signing.VerifyKey
    revoked: bool


def new_id(prefix: str, nbytes: int = 6) -> str:
    return f"{prefix}_{secrets.token_hex(nbytes)}"


class Core:
    """What admin and agent operations share; `apply` follows the store."""

    def __init__(
        self, cfg: ServerConfig, store: Store, key: nacl.signing.SigningKey, clock: Clock
    ) -> None:
        self.cfg = cfg
        self.dims = tuple(cfg.dimensions)
        self.store = store
        self.clock = clock
        self.started_at = clock()
        self.marks = ReplayMarks(self.started_at, {})
        self.guard = Guard(cfg)
        self.signing_key = key
        self.pool = mesh.Pool(cfg.mesh)
        store.scope_of = self.pool.scope_of
        self.compiler = Compiler(pool=self.pool.text)
        self.pub = Publisher(key, self.compiler)
        self.hub = self.pub.hub
        self.server_keys = {self.pub.key_id: key.verify_key}
        self.hosts: dict[str, HostAuth] = {}

    def check_host(self, host_id: str) -> HostAuth:
        """The host's agent key; refuses unknown (401) and revoked (403) hosts."""
        auth = self.hosts.get(host_id)
        if auth is None:
            raise Unauthorized(f"unknown host {host_id[:64]!r}", code="unknown_host")
        if auth.revoked:
            raise Forbidden(f"host {host_id} has been revoked", code="host_revoked")
        return auth

    async def persist_mark(self, host_id: str, ts: float) -> None:
        """Raise the host's replay mark to `ts`, durably."""
        async with self.store.write() as tx:
            tx.set_replay_mark(host_id, ts)
        self.marks.persisted(host_id, ts)

    def apply(self, commit: Commit) -> None:
        """Apply a durable commit's changes, then publish the hosts they changed."""
        c = self.compiler
        affected: set[str] = set()
        forced: set[str] = set()
        for change in commit.changes:
            match change:
                case WorkloadAdded(w) | WorkloadReaddressed(w):
                    affected |= c.add_workload(w)
                case WorkloadRemoved(wid):
                    affected |= c.remove_workload(wid)
                case RulesSet(rules):
                    affected |= c.set_rules(rules)
                case HostAdded() | HostMeshJoined() | HostRevoked():
                    affected |= self._apply_host(change)
                case HostsRecompiled(host_ids):
                    forced.update(host_ids)
        changed = self.pub.publish(affected, commit.generation, force=forced)
        if changed:
            self.store.persist_versions(changed)
            _log.debug("instructions.published", generation=commit.generation, hosts=len(changed))

    def _apply_host(self, change: HostAdded | HostMeshJoined | HostRevoked) -> set[str]:
        """A host's change; returns the hosts whose instructions it may change."""
        match change:
            case HostAdded(host_id, public_key):
                self.hosts[host_id] = HostAuth(crypto.verify_key_from_b64(public_key), False)
                self.pub.add_host(host_id)
                return {host_id}
            case HostMeshJoined(peer):
                return self.compiler.set_mesh_host(peer.host_id, peer)
            case HostRevoked(host_id):
                auth = self.hosts.get(host_id)
                if auth is not None:
                    self.hosts[host_id] = HostAuth(auth.verify_key, True)
                self.pub.drop_host(host_id)
                # Its peers drop it in this same commit.
                return self.compiler.set_mesh_host(host_id, None)
