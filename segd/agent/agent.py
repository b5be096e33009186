"""The enforcement agent: watch Docker, pair keyed containers, enforce nftables.

Wiring only. Docker's events (`docker`) and the server's answers (`link`)
become `HostEvent`s folded into the agent's knowledge (`host.Host`); the one
task that changes the kernel (`enforcer`) takes the containers they touched,
asks the pure reconciler (`reconcile.step`) for kernel operations, runs them
through the root module (`executor`) and folds each result back in, until
nothing is left to do. A version of the instructions touches only the
containers it changed; versions that arrive while the kernel is busy are
applied together.

With `[agent.mesh] enabled`, `mesh.MeshAgent` joins the segd mesh and keeps
the host's WireGuard interface, routes and mesh table equal to the mesh part
of each accepted version.

A container that joined another's network namespace is never enforced or
paired on its own, and nothing is ever applied in the host's namespace
(`sharing`). What each container's namespace should hold is in `reconcile`.

What containers' tables log comes back from the kernel module to the flow
reporter (`reporter`), which sends flow records every interval on its own
task; the agent's metrics (`metrics`) are served on an opt-in loopback listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from segd import log, sdnotify
from segd.agent.client import Denied, PairAnswer, ServerClient
from segd.agent.docker import DockerWatcher
from segd.agent.enforcer import Enforcer
from segd.agent.events import (
    BridgesChanged,
    ContainerGone,
    ContainerInfo,
    ContainerNetworksChanged,
    ContainerSeen,
    ContainerStarted,
    DockerEvent,
    HostEvent,
    InstructionsAccepted,
    Listed,
    MeshState,
    Paired,
    PairingRefused,
    SubnetsSeen,
)
from segd.agent.executor import Executor, Kernel
from segd.agent.flows import Directory
from segd.agent.host import Host, Report
from segd.agent.hostlock import host_lock_path
from segd.agent.link import ServerLink
from segd.agent.mesh import MeshAgent, turn_off
from segd.agent.metrics import AgentMetrics, MetricsListener
from segd.agent.observe import footprint, log_role, observe_op
from segd.agent.reporter import FlowReporter
from segd.agent.sharing import NsId
from segd.agent.state import Identity, InvalidInstructions, StateDir, verify_instructions
from segd.config import AgentConfig
from segd.firewall.kernel import Firewall, NetnsError, stat_ns, take_host_lock
from segd.wire import Instructions, SignedInstructions

_log = log.get(__name__)

HostLock = Callable[[], Callable[[], None]]
"""Take the host's lock (exit when another agent holds it); returns its release."""

NsOf = Callable[[str], NsId | None]
"""The identity of the namespace at a path; None when it cannot be read."""


def _host_lock() -> Callable[[], None]:
    fd = take_host_lock(host_lock_path())
    return lambda: os.close(fd)


def _ns_of(path: str) -> NsId | None:
    try:
        return stat_ns(path)
    except (NetnsError, OSError):
        return None


class Agent:
    def __init__(
        self,
        cfg: AgentConfig,
        *,
        activation_code: str = "",
        firewall: Kernel | None = None,
        docker: DockerWatcher | None = None,
        host_lock: HostLock = _host_lock,
        ns_of: NsOf = _ns_of,
    ) -> None:
        self.cfg = cfg
        self.state = StateDir(cfg.state_dir)
        self.activation_code = activation_code or cfg.activation_code
        self.docker = docker or DockerWatcher(cfg.docker_url)
        self.client = ServerClient(cfg.server, self.state.signing_key(), ca_file=cfg.server_ca)
        self.link = ServerLink(self.client, cfg.backoff_max_s)
        self.host = Host(isolate_unkeyed=cfg.isolate_unkeyed)
        self.metrics = AgentMetrics()
        self._directory: tuple[Instructions | None, Directory] = (None, Directory.of(None))
        self.reporter = FlowReporter(
            self.client,
            self._directory_now,
            self.metrics,
            interval=cfg.flow_interval_s,
            backoff_max=cfg.backoff_max_s,
            owner=self._owner_of,
        )
        self.kernel: Kernel = (
            firewall
            if firewall is not None
            else Firewall(on_log=self.reporter.on_log, on_count=self.reporter.on_count)
        )
        self.reporter.dump = getattr(self.kernel, "conntrack_dump", None)
        self.metrics.watch(self.host, lambda: getattr(self.kernel, "log_readers", 0))
        self._metrics_listener = (
            MetricsListener(self.metrics, cfg.metrics_listen) if cfg.metrics_listen else None
        )
        self.enforcer = Enforcer(
            self.host,
            Executor(self.kernel),
            self._report,
            observe=lambda op, res, s: observe_op(self.metrics, op, res, s),
        )
        self.enforcer.after_batch = self._pair_again_restarted
        self.mesh: MeshAgent | None = None
        if cfg.mesh.enabled:
            self.mesh = MeshAgent(
                cfg.mesh, cfg.state_dir, self.client, self.docker, self.kernel, self.link.retry
            )
            self.mesh.on_routed = self._mesh_routed
        self.ident: Identity | None = None
        self.ready = asyncio.Event()  # the first full reconcile is done
        self._host_lock = host_lock
        self._ns_of = ns_of
        self._bg: set[asyncio.Task[Any]] = set()
        self._saving = asyncio.Lock()
        self._resyncing = asyncio.Lock()
        self._saved_version = 0  # of the newest instructions on disk
        self._newest: SignedInstructions | None = None  # the newest accepted
        self._version_wanted = asyncio.Event()  # a paired container waits for a version

    # ---- lifecycle ------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled."""
        release = self._host_lock()
        try:
            await self.kernel.start()
            try:
                await self._run()
            finally:
                await self._shutdown()
        finally:
            release()

    async def _run(self) -> None:
        self.host.host_ns = self.kernel.host_namespaces
        self.ident = await self._identify()
        self.client.host_id = self.ident.host_id
        loaded = self.state.load_instructions(self.ident)
        if loaded is not None:
            self.host.on(InstructionsAccepted(loaded[1]))
            self._saved_version = loaded[1].version
            self._newest = loaded[0]
            _log.info("instructions.loaded", version=loaded[1].version)
            if self.mesh is not None:
                self.mesh.want(loaded[1].mesh)  # the mesh again, with or without the server
        if self.mesh is None:
            await turn_off(self.cfg.state_dir, self.kernel)
        elif await asyncio.to_thread(self.mesh.routed_before):
            self._fold(MeshState(True))  # an earlier run's mesh still routes the pool
        if self._metrics_listener is not None:
            await self._metrics_listener.start()
        async with asyncio.TaskGroup() as tg:
            if self.mesh is not None:
                tg.create_task(self.mesh.run())
            tg.create_task(self.reporter.run())
            tg.create_task(self.enforcer.run())
            tg.create_task(self.docker.watch(self._on_docker, self._resync))
            tg.create_task(self.link.poll(lambda: self.host.version, self._on_polled))
            tg.create_task(self._periodic())
            tg.create_task(self.link.push_sidecars())

    async def _shutdown(self, drain: float = 5.0) -> None:
        if self._bg:
            _, still = await asyncio.wait(self._bg, timeout=drain)
            for t in still:
                t.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.reporter.flush(), drain)  # what the interval holds
        await self.link.close(drain)
        if self._metrics_listener is not None:
            await self._metrics_listener.close()
        await self.docker.close()
        await self.kernel.close()
        _log.info("agent.stopped")

    async def _identify(self) -> Identity:
        ident = self.state.identity()
        if ident is not None:
            return ident
        if not self.activation_code:
            raise SystemExit(
                "segd agent: not registered; give an activation code "
                "(--activation-code or [agent] activation_code)"
            )
        hostname = self.cfg.hostname or socket.gethostname()
        reg = await self.link.retry(
            lambda: self.client.register(self.activation_code, hostname), "register"
        )
        ident = Identity(host_id=reg.host_id, server=self.cfg.server, server_keys=reg.server_keys)
        self.state.save_identity(ident)
        _log.info("agent.registered", host_id=reg.host_id)
        return ident

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg_done)

    def _bg_done(self, task: asyncio.Task[Any]) -> None:
        self._bg.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("agent.task_failed", error=repr(task.exception()))

    # ---- events in ------------------------------------------------------------------

    def _fold(self, ev: HostEvent) -> None:
        """One event into the host's state; wake the enforcement task."""
        for change in self.host.on(ev):
            log_role(change)
            self.link.sidecars_changed(self.host.sidecars)
        self._pair_again_restarted()
        self.enforcer.kick()

    def _mesh_routed(self) -> None:
        if not self.host.mesh_up:
            self._fold(MeshState(True))

    def _pair_again_restarted(self) -> None:
        """Containers whose restart was missed are unpaired and paired again, as a
        live restart is (their key is checked again)."""
        for cid in self.host.take_restarted():
            _log.info("container.restarted_unseen", container=cid[:12])
            self.link.unpair(cid, then=self._unpaired)

    async def _on_docker(self, ev: DockerEvent) -> None:
        self.metrics.docker_events.labels(type(ev).__name__).inc()
        match ev:
            case ContainerStarted(cid) | ContainerNetworksChanged(cid):
                # After the first sync, every start is seen: a container first seen
                # through an event (Docker connects networks before it says "start")
                # is in a namespace just made.
                self._spawn(self._on_start(cid, started=self.ready.is_set()))
            case ContainerGone(cid):
                self._on_gone(cid)
            case BridgesChanged():
                self._fold(SubnetsSeen(tuple(await self.docker.subnets())))

    async def _on_start(self, cid: str, *, started: bool) -> None:
        info = await self.docker.inspect(cid)
        if info is not None:
            self._fold(ContainerSeen(info, self._ns_of(info.netns_path), started))
            self._handle(cid)

    def _handle(self, cid: str) -> None:
        """Pair a container when it needs it; unpair one that joined another's namespace."""
        role = self.host.roles.get(cid)
        if self.host.needs_pairing(cid, self.link.busy):
            self.link.pair(self.host.containers[cid], self._on_answer)
        elif role is not None and role.kind in ("shares", "host") and cid in self.host.workloads:
            self.link.unpair(cid)  # paired before it was known to share

    def _unpaired(self, cid: str) -> None:
        """A container restarted while its workload was unpaired pairs again."""
        if cid in self.host.containers:
            self._handle(cid)

    def _on_gone(self, cid: str) -> None:
        self.link.cancel_pairing(cid)
        self._fold(ContainerGone(cid))
        if cid in self.host.workloads:
            self.link.unpair(cid, then=self._unpaired)

    async def _on_answer(self, info: ContainerInfo, answer: PairAnswer | Denied) -> None:
        if isinstance(answer, Denied):
            reason = f"{answer.code}: {answer.message}"
            self._fold(PairingRefused(info.id, reason))
            _log.warning(
                "pairing.denied", container=info.id[:12], reason=answer.message, code=answer.code
            )
            return
        _log.info(
            "workload.paired",
            container=info.id[:12],
            workload=answer.workload_id,
            labels=answer.labels,
        )
        self._fold(Paired(info.id, answer.version, info.ips))
        if answer.instructions is not None:
            await self._on_instructions(answer.instructions)
        elif self.host.awaiting:
            self._version_wanted.set()  # fetch it now, whatever the kernel is doing

    async def _on_instructions(self, signed: SignedInstructions) -> None:
        """Verify, keep and enforce newer instructions (stale or invalid: dropped)."""
        assert self.ident is not None
        if self._newest is not None and signed.payload == self._newest.payload:
            return  # the same version again (a pairing answer and the long-poll)
        try:
            instr = verify_instructions(signed, self.ident.server_keys, self.ident.host_id)
        except InvalidInstructions as e:
            _log.error("instructions.rejected", reason=str(e))
            return
        if instr.version <= self.host.version:
            return
        # On disk first: an agent restarted without the server never goes back to
        # instructions older than those it enforced.
        await self._save(signed, instr.version)
        if instr.version <= self.host.version:
            return  # newer ones were taken while these were written
        self._fold(InstructionsAccepted(instr))
        self._newest = signed
        if self.mesh is not None:
            self.mesh.want(instr.mesh)
        _log.info("instructions.accepted", version=instr.version, workloads=len(instr.workloads))
        if self.ready.is_set():
            self._unpair_stale()
            for cid in list(self.host.containers):
                self._handle(cid)  # a workload gone (unpaired elsewhere): pair again

    async def _on_polled(self, signed: SignedInstructions) -> None:
        """Instructions from the long-poll. The next poll goes out once the kernel
        has these (versions published meanwhile then come as one, and the server
        sends one copy, not one per version), unless a paired container waits
        for the version that brings its workload."""
        await self._on_instructions(signed)
        if not self.host.awaiting:
            self._version_wanted.clear()
            settled = asyncio.ensure_future(self.enforcer.converge())
            wanted = asyncio.ensure_future(self._version_wanted.wait())
            try:
                await asyncio.wait({settled, wanted}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                settled.cancel()
                wanted.cancel()

    async def _save(self, signed: SignedInstructions, version: int) -> None:
        """Keep the newest instructions on disk (off the loop; never an older one).
        A failed write is logged and tried again by the periodic reconcile (they
        are enforced all the same)."""
        async with self._saving:
            if version <= self._saved_version:
                return
            try:
                await asyncio.to_thread(self.state.save_instructions, signed)
            except OSError as e:
                _log.error("instructions.save_failed", version=version, error=str(e))
                return
            self._saved_version = version

    def _unpair_stale(self) -> None:
        for cid in self.host.stale_workloads(self.link.pairing):
            self.link.unpair(cid, then=self._unpaired)

    async def _resync(self) -> None:
        """Full reconcile against Docker (on start, periodically, and on every
        reconnect of the event stream)."""
        async with self._resyncing:
            await self._resync_once()

    async def _resync_once(self) -> None:
        since = self.host.revision  # events folded while Docker lists are newer
        running = {c.id: c for c in await self.docker.running()}
        self._fold(SubnetsSeen(tuple(await self.docker.subnets())))
        gone, seen = self.host.listing(running, since)
        for cid in gone:
            self._on_gone(cid)
        for info in seen:
            self._fold(ContainerSeen(info, self._ns_of(info.netns_path)))
        self._fold(Listed())
        await self.enforcer.converge()
        # Stale workloads first: a newcomer may have been given a dead one's IP.
        self._unpair_stale()
        await self.link.unpairings_landed(within=5.0)
        for cid in list(self.host.containers):
            self._handle(cid)
        if not self.ready.is_set():
            self.ready.set()
            sdnotify.notify("READY=1")
        _log.info("agent.synced", containers=len(running), enforced=len(self.host.enforced))

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reconcile_interval_s)
            if self.docker.connected.is_set():
                await self.round()

    async def round(self) -> None:
        """One periodic round: the instructions whose write failed written again, a
        full reconcile against Docker, the kernel's drift, the mesh's."""
        if self._newest is not None and self.host.version > self._saved_version:
            await self._save(self._newest, self.host.version)  # its write failed
        try:
            await self._resync()
            await self.enforcer.check_drift()
            if self.mesh is not None:
                await self.mesh.check()
        except Exception as e:  # keep reconciling whatever one round hit
            _log.error("reconcile.failed", error=repr(e))
        _log.debug("agent.stats", **self.footprint())

    def _directory_now(self) -> Directory:
        """Who is who in the instructions held now (made again when they change)."""
        instr = self.host.instr
        if self._directory[0] is not instr:
            self._directory = (instr, Directory.of(instr))
        return self._directory[1]

    def _owner_of(self, ip: str) -> str | None:
        """The running container that has address `ip` (the gate's logs name none)."""
        for cid, info in self.host.containers.items():
            if ip in info.ips and self.host.owner(cid):
                return cid
        return None

    def _report(self, r: Report) -> None:
        self.metrics.drift_repairs.labels("table" if r.container else "gate").inc()
        if r.container:
            cid, present = r.container[:12], r.table_present
            _log.warning("tamper.detected", container=cid, table_present=present)
        else:
            _log.warning("tamper.gate", detail=r.detail)
        self.link.report("tamper", r.container, r.detail)

    def footprint(self) -> dict[str, int]:
        """Counts that must stay flat under churn (leak checks) and memory."""
        return footprint(self.host, self.kernel.open_namespaces, len(self.link.pairing))
