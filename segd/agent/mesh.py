"""The agent's part of the segd mesh (adapter; the cores are in `segd.mesh`).

On start the agent joins the mesh (`PUT /v1/agent/mesh`: its WireGuard public
key and endpoint; the answer is the host's subnet), then makes the Docker
network with that subnet, the WireGuard interface, and from then on keeps the
kernel equal to the newest accepted `Instructions.mesh`: peers (replaced as a
whole), routes, the host table and Docker's `DOCKER-USER` accept. Nothing is
redone when the mesh did not change; a periodic check redoes it when the
interface lost its peers or vanished (wireguard-go killed).

Another host's mesh address may be a peer of this host's containers only
while the kernel routes the pool (through the interface, or `unreachable`),
for its traffic can then never leave in clear: `on_routed` tells the agent so
once a mesh is applied, or at start when the pool route of an earlier run is
still there; until then the agent keeps those addresses out of its tables.

Everything applied is kernel state that outlives the agent: wireguard-go runs
on as a daemon, so the mesh stays up while the agent is stopped, restarted or
cut off from the server (the last signed instructions are applied again at
start without the server). A host whose mesh is turned off (`enabled = false`
after it was on) has the interface, the table, the pool route and segd's
`DOCKER-USER` rules removed at the next start; the Docker network is kept.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiodocker

from segd import files, log, wire
from segd.agent.client import Denied, ServerClient
from segd.agent.docker import DockerWatcher
from segd.agent.executor import Kernel
from segd.config import AgentMeshConfig
from segd.errors import InvalidInput
from segd.firewall.kernel import (
    MeshError,
    NftError,
    WireGuardLink,
    apply_routes,
    docker_user,
    kernel_has_wireguard,
    link_exists,
    pool_routes,
    remove_pool_route,
    wireguard_go,
)
from segd.mesh import keys, network, plan
from segd.mesh.choice import NoWireGuard, choose

_log = log.get(__name__)

T = TypeVar("T")
Retry = Callable[[Callable[[], Awaitable[T]], str], Awaitable[T]]

MARKER = "mesh.on"  # in state_dir while the mesh is applied: holds the pool
_FAILURES = (MeshError, NftError, InvalidInput, aiodocker.DockerError, OSError)


def default_address() -> str:
    """The address of the default-route interface (what a packet out would carry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent
        return str(s.getsockname()[0])


class MeshAgent:
    def __init__(
        self,
        cfg: AgentMeshConfig,
        state_dir: str,
        client: ServerClient,
        docker: DockerWatcher,
        kernel: Kernel,
        retry: Retry[wire.MeshJoined],
    ) -> None:
        self.cfg = cfg
        self.state_dir = Path(state_dir)
        self.client = client
        self.docker = docker
        self.kernel = kernel
        self._retry = retry
        self.keys: keys.KeyPair | None = None
        self.link: WireGuardLink | None = None
        self._want: wire.Mesh | None = None  # from the newest accepted instructions
        self._joined: wire.MeshJoined | None = None
        self._applied: plan.Desired | None = None
        self._kick = asyncio.Event()
        self.applied = asyncio.Event()  # set once the kernel holds the mesh
        self.on_routed: Callable[[], None] = lambda: None  # the kernel routes the pool

    def want(self, mesh: wire.Mesh | None) -> None:
        """The mesh of newly accepted instructions (None: the server sent none)."""
        if mesh is not None and mesh != self._want:
            self._want = mesh
            self._kick.set()

    async def prepare(self) -> bool:
        """The key pair and the WireGuard to run; False when there is none (logged)."""
        self.keys = await asyncio.to_thread(keys.load_or_create, self.state_dir)
        has_kernel = await asyncio.to_thread(kernel_has_wireguard)
        try:
            path = choose(self.cfg.wireguard, has_kernel, wireguard_go())
        except NoWireGuard as e:
            _log.error("mesh.unavailable", reason=str(e))
            return False  # fail closed: no routes, the pool stays unreachable
        _log.info("mesh.wireguard", path=path)
        self.link = WireGuardLink(plan.IFNAME, path)
        return True

    async def run(self) -> None:
        if not await self.prepare():
            return
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._join())
            tg.create_task(self._apply_loop())

    async def apply(self, mesh: wire.Mesh) -> plan.Desired | None:
        """Apply `mesh` now (after `prepare`); what the kernel holds."""
        self._want = mesh
        await self._apply()
        return self._applied

    def routed_before(self) -> bool:
        """Whether the pool an earlier run applied is still routed by the kernel
        (not after a reboot, nor once the mesh was turned off)."""
        marker = self.state_dir / MARKER
        try:
            pool = marker.read_text().strip()
        except FileNotFoundError:
            return False
        return bool(pool) and pool in pool_routes()

    async def _join(self) -> None:
        assert self.keys is not None
        public = self.keys.public_b64
        try:
            endpoint = self.cfg.endpoint or f"{default_address()}:{self.cfg.listen_port}"
        except OSError as e:
            _log.error("mesh.no_endpoint", reason=f"no default route ({e.strerror}): set endpoint")
            return
        try:
            joined = await self._retry(lambda: self.client.join_mesh(public, endpoint), "mesh.join")
        except Denied as e:
            _log.error("mesh.join_refused", code=e.code, reason=e.message)
            return
        _log.info("mesh.joined", subnet=joined.subnet, pool=joined.pool, endpoint=endpoint)
        self._joined = joined
        self._kick.set()

    def _current(self) -> wire.Mesh | None:
        if self._want is not None:
            return self._want
        if self._joined is not None:
            return wire.Mesh(pool=self._joined.pool, subnet=self._joined.subnet, peers=[])
        return None

    async def _apply_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            try:
                await self._apply()
            except _FAILURES as e:
                self._applied = None  # the periodic check tries again
                _log.error("mesh.apply_failed", error=str(e) or repr(e))

    async def _apply(self) -> None:
        mesh = self._current()
        if mesh is None or self.link is None or self.keys is None:
            return
        local = await self._network(mesh.subnet)
        d = plan.desired(mesh, local, self.keys.public)
        if d == self._applied:
            return
        for why in d.skipped:
            _log.warning("mesh.peer_skipped", reason=why)
        await asyncio.to_thread(files.write_atomic, self.state_dir / MARKER, d.pool.encode())
        made = await asyncio.to_thread(self.link.ensure)
        port = self.cfg.listen_port
        await asyncio.to_thread(self.link.configure, self.keys.private, port, list(d.peers))
        await asyncio.to_thread(apply_routes, d)
        await self.kernel.gate_apply(plan.render_table(d))
        await asyncio.to_thread(docker_user, plan.docker_user_rules(d))
        self._applied = d
        self.applied.set()
        self.on_routed()
        _log.info(
            "mesh.applied", subnet=d.subnet, peers=len(d.peers), bridge=local.bridge, made=made
        )

    async def _network(self, subnet: str) -> plan.Local:
        """Create or adopt the mesh network; its bridge and gateway."""
        name = self.cfg.network
        net = await self.docker.network(name)
        if net is None:
            await self.docker.create_network(network.create_body(name, subnet))
            _log.info("mesh.network_created", network=name, subnet=subnet)
            net = await self.docker.network(name)
            if net is None:
                raise InvalidInput(f"network {name!r} vanished after it was created")
        bridge, gateway = network.adopt(net, subnet)
        return plan.Local(plan.IFNAME, bridge, gateway)

    async def check(self) -> None:
        """Periodic: apply again when the interface lost what it was given."""
        d, link = self._applied, self.link
        if link is None:
            return
        if d is not None:
            dev = await asyncio.to_thread(link.device)
            # The peers' keys: what a restarted or emptied interface loses.
            have = None if dev is None else {p.public_key for p in dev.peers}
            if have == {p.public_key for p in d.peers}:
                return
            _log.warning("mesh.drift", interface=link.ifname, present=dev is not None)
            self._applied = None
        self._kick.set()


async def turn_off(state_dir: str, kernel: Kernel) -> None:
    """Remove what an earlier run applied, if the mesh was on (its marker)."""
    marker = Path(state_dir) / MARKER
    if not marker.exists():
        return
    pool = marker.read_text().strip()
    await asyncio.to_thread(docker_user, [])
    await kernel.gate_apply(plan.render_table_removal())
    if await asyncio.to_thread(link_exists, plan.IFNAME):
        await asyncio.to_thread(WireGuardLink(plan.IFNAME, "userspace").remove)
    if pool:
        await asyncio.to_thread(remove_pool_route, pool)
    marker.unlink()
    _log.info("mesh.removed", pool=pool)
