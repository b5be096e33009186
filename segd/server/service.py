"""The segmentation server: its core, and the admin and agent operations over it.

`Service.open(cfg)` opens the store, compiles every host from it, follows the
store's commits (`Core.apply`) and builds the two sets of operations the HTTP
handlers call: `Service.admin` (rules, profiles, keys, workloads, hosts,
activation codes, the admin token) and `Service.agents` (registration,
pairing, instructions, reports). Each owns its own state; what they share is
the core.
"""

from __future__ import annotations

import time
from pathlib import Path

import nacl.signing

from segd import crypto, log
from segd.config import ServerConfig
from segd.server.admin import Admin
from segd.server.agents import Agents
from segd.server.compiler import Compiler
from segd.server.core import Clock, Core, HostAuth, new_id, sha256_hex
from segd.server.publish import Publisher
from segd.server.replay import ReplayMarks
from segd.server.store import Store

__all__ = ["Clock", "HostAuth", "Service", "new_id", "sha256_hex"]

_log = log.get("segd.server")

SIGNING_KEY_FILE = "server.key"
DB_FILE = "segd.db"


def _make_data_dir(data: Path) -> None:
    """The data dir, 0700. The signing key is made only once the store holds the
    dir's lock: never by a second server that is about to be refused."""
    data.mkdir(parents=True, exist_ok=True, mode=0o700)


class Service(Core):
    """The running server: the core, `admin` and `agents`."""

    def __init__(
        self, cfg: ServerConfig, store: Store, key: nacl.signing.SigningKey, clock: Clock
    ) -> None:
        super().__init__(cfg, store, key, clock)
        self.data_dir = Path(cfg.data_dir)
        self.admin = Admin(self, self.data_dir)
        self.agents = Agents(self)

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
        """Compile every host from the store, then follow its commits. Hosts whose
        content differs from the digest persisted with their version (or every
        host, when versions may have been lost in a crash) are published at the
        next generation."""
        store = self.store
        workloads = await store.workloads()
        self.compiler = Compiler(
            await store.rules(), workloads, pool=self.pool.text, mesh=await store.mesh_peers()
        )
        self.pub = Publisher(self.signing_key, self.compiler)
        self.hub = self.pub.hub
        self.hosts = {
            h.id: HostAuth(crypto.verify_key_from_b64(h.public_key), h.revoked)
            for h in await store.hosts()
        }
        self.marks = ReplayMarks(self.started_at, await store.replay_marks())
        states = {
            h: s for h, s in (await store.host_digests()).items() if not self.hosts[h].revoked
        }
        stale = self.pub.load(states)
        if store.versions_through < store.generation:
            # Versions handed out before a crash may be missing: none is reused.
            stale = sorted(states)
        store.follow(self.apply)
        if stale:
            async with store.write() as tx:
                tx.recompiled(stale)
            await store.flush()
        await self.admin.load()
        _log.info(
            "server.loaded",
            hosts=len(self.hosts),
            workloads=len(workloads),
            bumped=len(stale),
            generation=store.generation,
            key_id=self.pub.key_id,
        )

    def is_admin(self, token: str) -> bool:
        return self.admin.is_admin(token)

    async def close(self) -> None:
        self.hub.close()
        await self.store.close()
