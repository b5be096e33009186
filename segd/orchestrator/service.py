"""The orchestrator proper: container profiles, nodes, and the containers it runs.

An admin stores a container profile with the pairing key obtained from the
segmentation server; `run` instantiates it on a node through the Docker API, the
key and requested labels riding along as container labels (patent ¶0023-0026).
This module holds the rules (lookups, defaults, all-or-nothing runs, what to
record when); the store keeps state and `DockerNodes` talks to the engines.

A key admits new containers only until it expires (the containers it admitted
keep restarting): a profile whose key has expired starts nothing, and says so;
the admin issues a new key and sets it on the profile.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from segd import contract, log
from segd.config import OrchestratorConfig
from segd.errors import Conflict, InvalidInput, NotFound, SegdError
from segd.files import write_secret
from segd.orchestrator import validate, wire
from segd.orchestrator.docker import (
    DockerNodes,
    LiveContainer,
    OldNotRemoved,
    ssl_context,
)
from segd.orchestrator.model import ContainerRecord, ProfileRecord
from segd.orchestrator.store import Store

LOCAL_NODE = "local"
LOCAL_DOCKER_URL = "unix:///var/run/docker.sock"
DOCKER_TIMEOUT_S = 30.0
DB_FILE = "orchestrator.db"
TOKEN_FILE = "admin.token"  # noqa: S105 - a file name

_log = log.get(__name__)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _private_dir(path: str) -> Path:
    """The data dir, created if needed and readable by its owner only."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(p, 0o700)
    return p


class Orchestrator:
    """Open with `await Orchestrator.open(cfg)`; close with `await orch.close()`."""

    def __init__(
        self,
        cfg: OrchestratorConfig,
        store: Store,
        docker: DockerNodes,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.docker = docker
        self.data_dir = Path(cfg.data_dir)
        self.token_file = self.data_dir / TOKEN_FILE
        self._clock = clock
        self._dims = tuple(cfg.dimensions)
        self._token_hashes: set[str] = set()

    @classmethod
    async def open(
        cls, cfg: OrchestratorConfig, *, docker_timeout: float = DOCKER_TIMEOUT_S
    ) -> Orchestrator:
        data_dir = _private_dir(cfg.data_dir)
        store = await Store.open(data_dir / DB_FILE)
        orch = cls(cfg, store, DockerNodes(timeout=docker_timeout))
        try:
            await orch._first_start()
        except BaseException:
            await orch.close()
            raise
        return orch

    async def close(self) -> None:
        try:
            await self.docker.close()
        finally:
            await self.store.close()

    async def _first_start(self) -> None:
        if self.cfg.register_local_node:
            node = wire.Node(LOCAL_NODE, LOCAL_DOCKER_URL, "", "", "", self._clock())
            if await self.store.insert_node_once("local_node_registered", node):
                _log.info("node.added", node=LOCAL_NODE, endpoint=node.endpoint)
        self._token_hashes = await self.store.admin_token_hashes()
        if not self._token_hashes:
            token = secrets.token_urlsafe(32)
            write_secret(self.token_file, token + "\n")
            await self.store.add_admin_token_hash(token_hash(token), self._clock())
            self._token_hashes = {token_hash(token)}
            _log.info("admin_token.created", file=str(self.token_file))
        elif not self.token_file.exists():
            _log.warning("admin_token.file_missing", file=str(self.token_file))

    def check_token(self, token: str) -> bool:
        """True when `token` is the admin token (compared by hash, in constant time)."""
        h = token_hash(token)
        ok = False
        for known in self._token_hashes:
            ok |= hmac.compare_digest(h, known)
        return ok

    # ---- profiles -----------------------------------------------------------------

    async def add_profile(self, p: wire.ProfileIn) -> wire.Profile:
        p = validate.profile(p, self._dims)
        self._check_key_live(p.name, p.pairing_key)
        if await self.store.profile(p.name) is not None:
            raise Conflict(f"container profile {p.name!r} already exists")
        rec = ProfileRecord(
            name=p.name,
            image=p.image,
            command=p.command,
            env=p.env,
            networks=p.networks,
            labels=p.labels,
            pairing_key=p.pairing_key,
            description=p.description,
            created_at=self._clock(),
        )
        await self.store.insert_profile(rec)
        _log.info("profile.added", profile=rec.name, image=rec.image, labels=rec.labels)
        return rec.view()

    async def profiles(self) -> list[wire.Profile]:
        return [p.view() for p in await self.store.profiles()]

    async def _profile(self, name: str) -> ProfileRecord:
        validate.name("profile", name)
        p = await self.store.profile(name)
        if p is None:
            raise NotFound(f"no container profile {name!r}")
        return p

    async def set_profile_key(self, name: str, k: wire.KeyIn) -> wire.Profile:
        """Give the profile a new pairing key, for the containers started from now on."""
        validate.pairing_key(k.pairing_key)
        profile = await self._profile(name)
        self._check_key_live(name, k.pairing_key)
        if not await self.store.set_profile_key(name, k.pairing_key):
            raise NotFound(f"no container profile {name!r}")
        _log.info("profile.key_set", profile=name)
        return msgspec.structs.replace(profile, pairing_key=k.pairing_key).view()

    def _check_key_live(self, profile: str, token: str) -> None:
        """Refuse a key whose claims say it has expired: the server would pair no
        new container with it, and they would stay isolated."""
        exp = validate.key_expiry(token)
        if exp is not None and self._clock() >= exp:
            at = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(exp))
            raise SegdError(
                f"container profile {profile!r}: its pairing key expired at {at} and pairs no"
                " new container; issue a new key (segd ctl key issue) and set it"
                f" (segd ctl orch profile set-key {profile} --key -)",
                code="key_expired",
                status=409,
            )

    async def remove_profile(self, name: str) -> None:
        await self._profile(name)
        n = len(await self.store.containers(profile=name))
        if n:
            raise Conflict(
                f"container profile {name!r} is used by {n} container(s): rm or change them first"
            )
        await self.store.delete_profile(name)
        _log.info("profile.removed", profile=name)

    # ---- nodes --------------------------------------------------------------------

    async def add_node(self, n: wire.NodeIn) -> wire.Node:
        validate.node(n)
        node = wire.Node(n.name, n.endpoint, n.tls_cert, n.tls_key, n.tls_ca, self._clock())
        ssl_context(node)  # refuse unusable TLS files now, not at the first run
        if await self.store.node(n.name) is not None:
            raise Conflict(f"node {n.name!r} already exists")
        await self.store.insert_node(node)
        _log.info("node.added", node=node.name, endpoint=node.endpoint)
        return node

    async def nodes(self) -> list[wire.Node]:
        return await self.store.nodes()

    async def _node(self, name: str) -> wire.Node:
        validate.name("node", name)
        node = await self.store.node(name)
        if node is None:
            raise NotFound(f"no node {name!r}")
        return node

    async def _default_node(self) -> wire.Node:
        """`local` when registered, else the only node."""
        nodes = await self.store.nodes()
        for n in nodes:
            if n.name == LOCAL_NODE:
                return n
        if len(nodes) == 1:
            return nodes[0]
        if not nodes:
            raise InvalidInput("no nodes registered: add one first")
        names = ", ".join(n.name for n in nodes)
        raise InvalidInput(f"node: required when there are several nodes ({names})")

    async def remove_node(self, name: str) -> None:
        await self._node(name)
        n = len(await self.store.containers(node=name))
        if n:
            raise Conflict(f"node {name!r} has {n} container(s): rm them first")
        await self.store.delete_node(name)
        await self.docker.forget(name)
        _log.info("node.removed", node=name)

    # ---- containers ---------------------------------------------------------------

    def _new_name(self, profile: str) -> str:
        return f"{profile}-{secrets.token_hex(4)}"

    async def run(self, r: wire.RunIn) -> list[wire.Container]:
        """Start `count` containers of a profile; all or nothing."""
        validate.run(r)
        profile = await self._profile(r.profile)
        self._check_key_live(profile.name, profile.pairing_key)
        node = await self._node(r.node) if r.node is not None else await self._default_node()
        started: list[wire.Container] = []
        try:
            for _ in range(r.count):
                started.append(await self._start_one(node, profile))
        except BaseException as e:
            if started:
                _log.warning("run.rolling_back", profile=profile.name, containers=len(started))
                for c in started:
                    await self._forget_container(node, c.id)
            if isinstance(e, SegdError):
                _log.warning(
                    "container.run_failed", profile=profile.name, node=node.name, error=e.code
                )
            raise
        return started

    async def _start_one(self, node: wire.Node, profile: ProfileRecord) -> wire.Container:
        live = await self.docker.run(
            node, profile, self._new_name(profile.name), self.cfg.container_labels
        )
        rec = ContainerRecord(live.id, live.name, node.name, profile.name, self._clock())
        try:
            await self.store.insert_container(rec)
        except BaseException:
            await self.docker.rm(node, live.id)
            raise
        _log.info(
            "container.started",
            container=live.id[:12],
            name=live.name,
            node=node.name,
            profile=profile.name,
            labels=profile.labels,
        )
        return _view(rec, live, profile)

    async def _forget_container(self, node: wire.Node, container_id: str) -> None:
        try:
            await self.docker.rm(node, container_id)
            await self.store.delete_container(container_id)
        except SegdError as e:
            _log.error("container.rollback_failed", container=container_id[:12], error=e.message)

    async def ps(self, node: str | None = None) -> list[wire.Container]:
        """Recorded containers with their live state; a down node shows `unknown`."""
        if node is not None:
            await self._node(node)
        records = await self.store.containers(node=node)
        profiles = {p.name: p for p in await self.store.profiles()}
        wanted = sorted({r.node for r in records})
        live = await asyncio.gather(*(self._live(n) for n in wanted))
        by_node = dict(zip(wanted, live, strict=True))
        out: list[wire.Container] = []
        for rec in records:
            seen = by_node[rec.node]
            state = None if seen is None else seen.get(rec.id)
            out.append(_view(rec, state, profiles.get(rec.profile), missing=seen is not None))
        return out

    async def _live(self, name: str) -> dict[str, LiveContainer] | None:
        """Managed containers on a node by id; None when it cannot be asked."""
        node = await self.store.node(name)
        if node is None:
            return None
        try:
            return {c.id: c for c in await self.docker.ps(node)}
        except SegdError as e:
            _log.warning("node.unreachable", node=name, error=e.message)
            return None

    async def _find(self, ref: str) -> ContainerRecord:
        validate.container_ref(ref)
        found = await self.store.find_containers(ref)
        exact = [c for c in found if ref in (c.id, c.name)]
        if exact:
            return exact[0]
        if len(ref) < 4 or not found:
            raise NotFound(f"no container {ref!r} started by this orchestrator")
        if len(found) > 1:
            raise Conflict(f"container id prefix {ref!r} is ambiguous: give more characters")
        return found[0]

    async def rm(self, ref: str) -> wire.Removed:
        rec = await self._find(ref)
        node = await self._node(rec.node)
        existed = await self.docker.rm(node, rec.id)
        await self.store.delete_container(rec.id)
        _log.info("container.removed", container=rec.id[:12], node=rec.node, was_gone=not existed)
        return wire.Removed(id=rec.id, name=rec.name, node=rec.node, was_gone=not existed)

    async def change(self, ref: str, c: wire.ChangeIn) -> wire.Changed:
        """Replace a container by one of another profile: new first, then old goes."""
        old = await self._find(ref)
        profile = await self._profile(c.profile)
        self._check_key_live(profile.name, profile.pairing_key)
        node = await self._node(old.node)
        name = self._new_name(profile.name)
        try:
            live = await self.docker.change(node, old.id, profile, name, self.cfg.container_labels)
        except OldNotRemoved as e:
            rec = ContainerRecord(e.new.id, e.new.name, node.name, profile.name, self._clock())
            await self.store.insert_container(rec)
            _log.error("container.change_incomplete", old=old.id[:12], new=e.new.id[:12])
            raise
        rec = ContainerRecord(live.id, live.name, node.name, profile.name, self._clock())
        await self.store.replace_container(old.id, rec)
        _log.info(
            "container.changed",
            old=old.id[:12],
            new=live.id[:12],
            node=node.name,
            old_profile=old.profile,
            profile=profile.name,
        )
        return wire.Changed(old=old.id, new=_view(rec, live, profile))


def _view(
    rec: ContainerRecord,
    live: LiveContainer | None,
    profile: ProfileRecord | None,
    *,
    missing: bool = False,
) -> wire.Container:
    """What the API shows: Docker's view when there is one, else the profile's."""
    if live is not None:
        state = live.state if live.state in _STATES else "unknown"
        return wire.Container(
            id=rec.id,
            name=rec.name,
            node=rec.node,
            profile=rec.profile,
            created_at=rec.created_at,
            state=state,  # type: ignore[arg-type]
            status=live.status,
            labels=contract.requested_labels(live.labels),
            pairing_key=wire.mask(live.labels.get(contract.KEY_LABEL, "")),
        )
    return wire.Container(
        id=rec.id,
        name=rec.name,
        node=rec.node,
        profile=rec.profile,
        created_at=rec.created_at,
        state="missing" if missing else "unknown",
        status="not on the node" if missing else "node unreachable",
        labels=profile.labels if profile else {},
        pairing_key=wire.mask(profile.pairing_key) if profile else "",
    )


_STATES = frozenset({"created", "running", "paused", "restarting", "removing", "exited", "dead"})
