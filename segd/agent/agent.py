"""The enforcement agent: watch Docker, pair keyed containers, enforce nftables.

Per container the desired state is one of:

* `workload`  — paired: its instructions rendered as the namespace's table, and
  its IPs admitted by the host gate;
* `isolated`  — keyed but not (yet) paired, denied, or unkeyed while
  `isolate_unkeyed` is on: an isolation table, and never in the gate;
* `exempt`    — unkeyed with `isolate_unkeyed = false`: no table, admitted by the gate.

That is for a container that owns its network namespace (`sharing`): one that
joined another's (`--network container:X`) is never enforced or paired on its
own, and nothing is ever applied in the host's namespace.

Every kernel change goes through one lock, so the gate admits an IP only after
its container's own table is in place, and removes it before anything else when
the container dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import msgspec

from segd import log, sdnotify
from segd.agent import sharing
from segd.agent.client import Denied, ServerClient, ServerUnavailable
from segd.agent.docker import ContainerInfo, DockerWatcher
from segd.agent.events import (
    BridgesChanged,
    ContainerGone,
    ContainerNetworksChanged,
    ContainerStarted,
    DockerEvent,
)
from segd.agent.hostlock import host_lock_path
from segd.agent.retry import Backoff
from segd.agent.sharing import NsId, Role
from segd.agent.state import Identity, InvalidInstructions, StateDir, verify_instructions
from segd.config import AgentConfig
from segd.firewall import render
from segd.firewall.gate import render_gate, render_gate_add, render_gate_remove, render_gate_subnets
from segd.firewall.kernel import (
    Firewall,
    NamespaceGone,
    NetnsError,
    NftError,
    NsRef,
    stat_ns,
    take_host_lock,
)
from segd.wire import Instructions, PairIn, SidecarIn, SignedInstructions, WorkloadPolicy

_log = log.get(__name__)

Kind = Literal["workload", "isolated", "exempt"]
GateEntry = tuple[str, str]
T = TypeVar("T")

# Refusals that can change by themselves: the IP is still held by a workload
# whose unpairing is on its way (the container that had it died moments ago).
TRANSIENT_DENIALS = frozenset({"ip_in_use"})


class Enforced(msgspec.Struct):
    """What the agent put in one container's namespace (and the gate)."""

    kind: Kind
    ns: NsRef
    policy: WorkloadPolicy | None = None  # the applied policy (workload kind)
    log_rules: frozenset[str] = frozenset()  # rules whose accepts it logs
    structure: object = None  # render.set_structure_key() of the applied policy
    sets: dict[str, list[str]] = {}
    listing: str | None = None  # `list table` right after our last change
    gated: list[GateEntry] = []  # (host bridge port, ip) pairs admitted by the gate
    ports: dict[str, str] | None = None  # ip -> host bridge port, once looked up


def _in_table(rec: Enforced | None) -> set[str] | None:
    """The peer sets our last change left in the namespace's table; None when
    unknown (nothing applied yet, or found changed): the table is then
    replaced whole rather than rewritten in place."""
    if rec is None or rec.listing is None:
        return None
    return render.referenced_sets(rec.policy) if rec.policy is not None else set()


class Agent:
    def __init__(
        self,
        cfg: AgentConfig,
        *,
        activation_code: str = "",
        firewall: Firewall | None = None,
    ) -> None:
        self.cfg = cfg
        self.host_lock_path = host_lock_path()
        self.state = StateDir(cfg.state_dir)
        self.key = self.state.signing_key()
        self.activation_code = activation_code or cfg.activation_code
        self.firewall = firewall or Firewall()
        self.docker = DockerWatcher(cfg.docker_url)
        self.client = ServerClient(cfg.server, self.key, ca_file=cfg.server_ca)
        self.ident: Identity | None = None
        self.instr: Instructions | None = None
        self.containers: dict[str, ContainerInfo] = {}
        self._nsids: dict[str, NsId | None] = {}  # identity of each container's namespace
        self.roles: dict[str, Role] = {}  # sharing.assign() over what is running
        self._sidecars_changed = asyncio.Event()
        self._sidecars_sent: list[SidecarIn] | None = None
        self.enforced: dict[str, Enforced] = {}
        self.denied: dict[str, str] = {}
        self.synced = asyncio.Event()
        self.ready = asyncio.Event()
        self._kernel = asyncio.Lock()
        self._pairing: dict[str, asyncio.Task[None]] = {}
        self._unpairing: dict[str, asyncio.Task[None]] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self._subnets: list[str] = []
        self._workloads: dict[str, WorkloadPolicy] = {}
        self._first_sync = True
        self._server_back = asyncio.Event()
        self._saving = asyncio.Lock()
        self._saved_version = 0

    # ---- lifecycle ------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled."""
        host_lock = take_host_lock(self.host_lock_path)
        try:
            await self._run()
        finally:
            os.close(host_lock)

    async def _run(self) -> None:
        await self.firewall.start()
        try:
            await self._identify()
            loaded = self.state.load_instructions(self._ident())
            if loaded is not None:
                self._set_instructions(loaded[1])
                self._saved_version = loaded[1].version
                _log.info("instructions.loaded", version=loaded[1].version)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.docker.watch(self._on_event, self._resync))
                tg.create_task(self._poll_instructions())
                tg.create_task(self._periodic())
                tg.create_task(self._push_sidecars())
        finally:
            await self._shutdown()

    async def _shutdown(self, drain: float = 5.0) -> None:
        pending = [*self._pairing.values(), *self._unpairing.values(), *self._bg]
        if pending:
            _, still = await asyncio.wait(pending, timeout=drain)
            for t in still:
                t.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        await self.client.close()
        await self.docker.close()
        await self.firewall.close()
        _log.info("agent.stopped")

    def _ident(self) -> Identity:
        assert self.ident is not None
        return self.ident

    async def _identify(self) -> None:
        ident = self.state.identity()
        if ident is None:
            if not self.activation_code:
                raise SystemExit(
                    "segd agent: not registered; give an activation code "
                    "(--activation-code or [agent] activation_code)"
                )
            hostname = self.cfg.hostname or socket.gethostname()
            reg = await self._retry(
                lambda: self.client.register(self.activation_code, hostname), "register"
            )
            ident = Identity(
                host_id=reg.host_id, server=self.cfg.server, server_keys=reg.server_keys
            )
            self.state.save_identity(ident)
            _log.info("agent.registered", host_id=reg.host_id)
        self.ident = ident
        self.client.host_id = ident.host_id

    # ---- docker events and reconcile -------------------------------------------------

    async def _on_event(self, ev: DockerEvent) -> None:
        match ev:
            case ContainerStarted(cid) | ContainerNetworksChanged(cid):
                self._spawn(self._on_start(cid))
            case ContainerGone(cid):
                await self._on_gone(cid)
            case BridgesChanged():
                await self._refresh_subnets()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg_done)

    def _bg_done(self, task: asyncio.Task[Any]) -> None:
        self._bg.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("agent.task_failed", error=repr(task.exception()))

    async def _on_start(self, cid: str) -> None:
        info = await self.docker.inspect(cid)
        if info is None:
            return
        await self._track(info)
        await self._reassign()
        await self._handle(info)

    async def _track(self, info: ContainerInfo) -> None:
        """Record what Docker says; a restarted container (new namespace or
        addresses) loses what was enforced for its old one, but stays paired."""
        old = self.containers.get(info.id)
        if old is not None and (old.pid != info.pid or old.ips != info.ips):
            await self._forget(info.id, unpair=False)
        self.containers[info.id] = info
        self._nsids[info.id] = _ns_identity(info.netns_path)

    async def _reassign(self) -> None:
        """Decide again which container owns which namespace (`sharing.assign`).
        Each change is logged once; a container that stops owning its namespace
        loses what was enforced for it (nothing is written into that namespace)."""
        seen = [
            sharing.Seen(
                id=cid,
                joins=info.joins,
                host_mode=info.host_network,
                ns=self._nsids.get(cid),
            )
            for cid, info in self.containers.items()
        ]
        roles = sharing.assign(seen, self.firewall.host_namespaces)
        lost: list[str] = []
        for cid, role in roles.items():
            old = self.roles.get(cid)
            if role == old:
                continue
            self._log_role(self.containers[cid], role, first=old is None)
            if old is not None and old.kind == "owner":
                lost.append(cid)
        self.roles = roles
        self._sidecars_changed.set()
        for cid in lost:
            await self._forget(cid, unpair=False)

    @staticmethod
    def _log_role(info: ContainerInfo, role: Role, *, first: bool) -> None:
        cid = info.id[:12]
        if role.kind == "shares":
            _log.warning(
                "container.shares_namespace",
                container=cid,
                owner=role.owner[:12],
                keyed=bool(info.pairing_key),
                reason="in another container's network namespace: that container's "
                "table applies; not enforced or paired on its own",
            )
        elif role.kind == "host":
            _log.warning(
                "container.host_namespace",
                container=cid,
                keyed=bool(info.pairing_key),
                reason="in the host's network namespace: never enforced or paired",
            )
        elif role.kind == "unknown":
            _log.warning(
                "container.namespace_unknown",
                container=cid,
                reason="its namespace cannot be read, or another container claims it: "
                "not enforced until that clears",
            )
        elif not first:
            _log.info("container.owns_namespace", container=cid)

    async def _handle(self, info: ContainerInfo) -> None:
        """Bring one container to its desired state, pairing it when needed."""
        role = self.roles.get(info.id)
        if role is None or role.kind != "owner":
            if role is not None and role.kind in ("shares", "host") and info.id in self._workloads:
                self._start_unpair(info.id)  # paired before it was known to share
            return
        pol = self._workloads.get(info.id)
        # A restarted container with new addresses pairs again: the server
        # re-addresses its workload without using the key again. One restarted
        # while the unpairing of its death is on its way pairs again after it
        # (the server re-admits it, also without a use).
        current = pol is not None and pol.ips == info.ips and info.id not in self._unpairing
        if (
            info.pairing_key
            and not current
            and info.id not in self.denied
            and info.id not in self._pairing
        ):
            task = asyncio.create_task(self._pair(info))
            self._pairing[info.id] = task
            task.add_done_callback(functools.partial(self._pair_done, info.id))
        await self._converge(info.id)

    def _pair_done(self, cid: str, task: asyncio.Task[None]) -> None:
        if self._pairing.get(cid) is task:
            del self._pairing[cid]
        if not task.cancelled() and task.exception() is not None:
            _log.error("pairing.failed", container=cid[:12], error=repr(task.exception()))

    async def _on_gone(self, cid: str) -> None:
        info = self.containers.pop(cid, None)
        self._nsids.pop(cid, None)
        task = self._pairing.pop(cid, None)
        if task is not None:
            task.cancel()
        self.denied.pop(cid, None)
        if info is not None:
            await self._reassign()
        if info is None and cid not in self._workloads:
            return
        await self._forget(cid, unpair=True)

    async def _forget(self, cid: str, *, unpair: bool) -> None:
        async with self._kernel:
            rec = self.enforced.pop(cid, None)
            if rec is not None:
                await self._gate_sync(drop=rec.gated, add=[])
                try:
                    await self.firewall.forget(rec.ns)
                except Exception as e:
                    _log.warning("firewall.forget_failed", container=cid[:12], error=repr(e))
        if unpair and cid in self._workloads:
            self._start_unpair(cid)

    def _start_unpair(self, cid: str) -> None:
        if cid in self._unpairing:
            return
        task = asyncio.create_task(self._unpair(cid))
        self._unpairing[cid] = task
        task.add_done_callback(functools.partial(self._unpair_done, cid))

    async def _unpair(self, cid: str) -> None:
        try:
            await self._retry(lambda: self.client.unpair(cid), "unpair", cid)
            _log.info("workload.unpaired", container=cid[:12])
        except Denied as e:
            _log.warning("unpair.refused", container=cid[:12], error=e.message)

    async def _resync(self) -> None:
        """Full reconcile against Docker (on start and every stream reconnect)."""
        running = {c.id: c for c in await self.docker.running()}
        await self._refresh_subnets()
        first = self._first_sync
        for cid in list(self.containers):
            if cid not in running:
                await self._on_gone(cid)
        for info in running.values():
            await self._track(info)
        await self._reassign()
        if first:
            # Tables first, then the gate from scratch in one transaction.
            for info in running.values():
                await self._converge(info.id, gate=False)
            await self._rebuild_gate()
            self._first_sync = False
        # Stale workloads first: a newcomer may have been given a dead one's IP.
        await self._unpair_stale(wait=True)
        for info in running.values():
            await self._handle(info)
        self.synced.set()
        if not self.ready.is_set():
            self.ready.set()
            sdnotify.notify("READY=1")
        _log.info("agent.synced", containers=len(running), enforced=len(self.enforced))

    async def _rebuild_gate(self) -> None:
        async with self._kernel:
            await self._rebuild_gate_locked()

    async def _rebuild_gate_locked(self) -> bool:
        """The gate from scratch: exactly the entries of what is enforced now."""
        entries = sorted({e for r in self.enforced.values() for e in r.gated})
        try:
            await self.firewall.gate_apply(render_gate(entries, self._subnets))
        except Exception as e:
            _log.error("gate.rebuild_failed", error=repr(e))
            return False
        return True

    async def _gate_sync(self, *, drop: list[GateEntry], add: list[GateEntry]) -> None:
        """Apply a gate change; if the gate is not what we left (deleted or
        altered behind our back), rebuild it whole and report the tampering.
        Callers hold the kernel lock and have updated `self.enforced` first."""
        try:
            for plan in (render_gate_remove(drop), render_gate_add(add)):
                if plan is not None:
                    await self.firewall.gate_apply(plan)
        except Exception as e:
            _log.warning("tamper.gate", error=repr(e))
            if await self._rebuild_gate_locked():
                self._spawn(self._report("tamper", "", f"host gate changed outside segd: {e}"))

    async def _refresh_subnets(self) -> None:
        subnets = await self.docker.subnets()
        if subnets != self._subnets:
            self._subnets = subnets
            if not self._first_sync:
                async with self._kernel:
                    await self.firewall.gate_apply(render_gate_subnets(subnets))

    async def _unpair_stale(self, *, wait: bool = False) -> None:
        """Unpair workloads whose container is no longer running here; with
        `wait`, give those unpairings a few seconds to land first."""
        if self._first_sync:
            return
        for cid in list(self._workloads):
            if cid not in self.containers and cid not in self._pairing:
                self._start_unpair(cid)
            elif self.roles.get(cid, sharing.UNKNOWN).kind in ("shares", "host"):
                self._start_unpair(cid)  # never a workload of its own
        if wait and self._unpairing:
            await asyncio.wait(list(self._unpairing.values()), timeout=5.0)

    def _unpair_done(self, cid: str, task: asyncio.Task[None]) -> None:
        if self._unpairing.get(cid) is task:
            del self._unpairing[cid]

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reconcile_interval_s)
            if not self.docker.connected.is_set():
                continue
            try:
                await self._resync()
                await self.check_drift()
            except Exception as e:  # keep reconciling whatever one round hit
                _log.error("reconcile.failed", error=repr(e))
            _log.debug("agent.stats", **self.footprint())

    def footprint(self) -> dict[str, int]:
        """Counts that must stay flat under churn (leak checks) and memory."""
        with open("/proc/self/statm") as f:
            rss_pages = int(f.read().split()[1])
        return {
            "tasks": len(asyncio.all_tasks()),
            "fds": len(os.listdir("/proc/self/fd")),
            "namespaces": self.firewall.open_namespaces,
            "containers": len(self.containers),
            "enforced": len(self.enforced),
            "workloads": len(self._workloads),
            "pairing": len(self._pairing),
            "rss_kb": rss_pages * os.sysconf("SC_PAGE_SIZE") // 1024,
        }

    # ---- pairing and instructions ---------------------------------------------------

    async def _pair(self, info: ContainerInfo) -> None:
        unpairing = self._unpairing.get(info.id)
        if unpairing is not None:  # it died and started again: unpaired first, then paired
            await asyncio.wait([unpairing])
        req = PairIn(
            container_id=info.id,
            pairing_key=info.pairing_key,
            ips=info.ips,
            name=info.name,
            requested_labels=info.requested_labels,
        )
        try:
            result = await self._retry(lambda: self.client.pair(req), "pair", info.id)
        except Denied as e:
            self.denied[info.id] = f"{e.code}: {e.message}"
            _log.warning("pairing.denied", container=info.id[:12], reason=e.message, code=e.code)
            return
        _log.info(
            "workload.paired",
            container=info.id[:12],
            workload=result.workload_id,
            labels=result.labels,
            version=result.version,
        )
        if not isinstance(result.instructions, msgspec.UnsetType):  # a server before versions
            await self.accept(result.instructions)
        # Otherwise the long-poll, woken by the same commit, brings that version.

    async def accept(self, signed: SignedInstructions) -> bool:
        """Verify, keep and enforce newer instructions; False when stale or invalid."""
        try:
            instr = verify_instructions(signed, self._ident().server_keys, self._ident().host_id)
        except InvalidInstructions as e:
            _log.error("instructions.rejected", reason=str(e))
            return False
        if self.instr is not None and instr.version <= self.instr.version:
            return False
        self._set_instructions(instr)
        _log.info("instructions.accepted", version=instr.version, workloads=len(instr.workloads))

        # Containers waiting for their first table go first: they are the ones
        # whose traffic is held; the rest only see membership changes.
        def waiting_first(cid: str) -> tuple[bool, str]:
            rec = self.enforced.get(cid)
            return (rec is not None and rec.kind == "workload", cid)

        saved = asyncio.create_task(self._save(signed, instr.version))
        for cid in sorted(self.containers, key=waiting_first):
            await self._converge(cid)
        await saved
        if self.synced.is_set():
            await self._unpair_stale()
        return True

    async def _save(self, signed: SignedInstructions, version: int) -> None:
        """Keep the newest instructions on disk (off the loop; never an older one)."""
        async with self._saving:
            if version <= self._saved_version:
                return
            await asyncio.to_thread(self.state.save_instructions, signed)
            self._saved_version = version

    async def _retry(self, op: Callable[[], Awaitable[T]], what: str, cid: str = "") -> T:
        """Run `op` until the server answers: unreachable, or refused for a reason
        that changes by itself (TRANSIENT_DENIALS), means try again later."""
        backoff = Backoff(self.cfg.backoff_max_s)
        while True:
            try:
                return await op()
            except ServerUnavailable as e:
                _log.warning("server.unavailable", op=what, container=cid[:12], error=str(e))
            except Denied as e:
                if e.code not in TRANSIENT_DENIALS:
                    raise
                _log.info("server.retry", op=what, container=cid[:12], code=e.code)
            # Wake early (with a random spread) once the long-poll sees the server again.
            await backoff.wait(self._server_back)

    def _set_instructions(self, instr: Instructions) -> None:
        self.instr = instr
        self._workloads = {w.container_id: w for w in instr.workloads}

    async def _poll_instructions(self) -> None:
        backoff = Backoff(self.cfg.backoff_max_s)
        while True:
            since = self.instr.version if self.instr is not None else 0
            try:
                signed = await self.client.instructions(since, wait=25.0)
                backoff.reset()
                if not self._server_back.is_set():
                    _log.info("server.reachable")
                    self._server_back.set()
            except ServerUnavailable as e:
                if self._server_back.is_set():
                    self._server_back = asyncio.Event()
                _log.warning("server.unavailable", op="instructions", error=str(e))
                await backoff.wait()
                continue
            except Denied as e:
                _log.error("instructions.refused", code=e.code, error=e.message)
                await asyncio.sleep(self.cfg.backoff_max_s)
                continue
            except Exception as e:  # a bad answer must not stop enforcement
                _log.error("instructions.poll_failed", error=repr(e))
                await backoff.wait()
                continue
            if signed is not None:
                # Applied alongside the next poll (as a pairing's answer once was):
                # a version that comes meanwhile does not wait for this pass.
                self._spawn(self._accept_polled(signed))

    async def _accept_polled(self, signed: SignedInstructions) -> None:
        try:
            await self.accept(signed)
        except Exception as e:  # enforcement retries on the next reconcile
            _log.error("instructions.apply_failed", error=repr(e))

    # ---- enforcement ------------------------------------------------------------------

    def _desired(self, info: ContainerInfo) -> tuple[Kind, WorkloadPolicy | None]:
        pol = self._workloads.get(info.id)
        if pol is not None:
            return "workload", pol
        if info.pairing_key or self.cfg.isolate_unkeyed:
            return "isolated", None
        return "exempt", None

    async def _converge(self, cid: str, *, gate: bool = True) -> None:
        info = self.containers.get(cid)
        if info is None or self.roles.get(cid, sharing.UNKNOWN).kind != "owner":
            return
        kind, pol = self._desired(info)
        ns = NsRef(key=cid, path=info.netns_path)
        async with self._kernel:
            if cid not in self.containers:  # died while we waited
                return
            rec = self.enforced.get(cid)
            if rec is not None and rec.ns != ns:
                with contextlib.suppress(Exception):
                    await self.firewall.forget(rec.ns)
                rec = None
            t0 = time.perf_counter()
            try:
                rec = await self._apply(info, ns, kind, pol, rec)
            except Exception as e:
                # Fail closed: the gate never admitted this IP, or we pull it now.
                if isinstance(e, NamespaceGone):  # it died while we worked: not an error
                    _log.info("enforce.container_gone", container=cid[:12])
                else:
                    _log.error("enforce.failed", container=cid[:12], error=repr(e))
                if rec is not None and rec.gated:
                    dropped, rec.gated = rec.gated, []
                    await self._gate_sync(drop=dropped, add=[])
                return
            self.enforced[cid] = rec
            want_gate: list[GateEntry] = []
            # Keyed containers look their ports up while their pairing is in flight.
            if rec.ports is None and (kind != "isolated" or info.pairing_key):
                rec.ports = await self._ports(ns)
            if kind in ("workload", "exempt") and rec.ports is not None:
                want_gate = sorted((rec.ports[ip], ip) for ip in info.ips if ip in rec.ports)
            if gate and rec.gated != want_gate:
                drop = sorted(set(rec.gated) - set(want_gate))
                add = sorted(set(want_gate) - set(rec.gated))
                rec.gated = list(want_gate)
                await self._gate_sync(drop=drop, add=add)
            elif not gate:
                rec.gated = list(want_gate)
            _log.debug(
                "enforce.done",
                container=cid[:12],
                kind=kind,
                ms=round((time.perf_counter() - t0) * 1000, 2),
            )

    async def _ports(self, ns: NsRef) -> dict[str, str]:
        """IP -> host-side bridge port; the gate admits an IP only on its own port."""
        try:
            return await self.firewall.ports(ns)
        except Exception as e:
            _log.error("enforce.ports_failed", ns=ns.key[:12], error=repr(e))
            return {}

    async def _apply(
        self,
        info: ContainerInfo,
        ns: NsRef,
        kind: Kind,
        pol: WorkloadPolicy | None,
        rec: Enforced | None,
    ) -> Enforced:
        gated = rec.gated if rec is not None else []
        ports = rec.ports if rec is not None else None
        if kind == "exempt":
            if rec is not None and rec.kind != "exempt":
                await self.firewall.apply(ns, render.render_removal())
            return Enforced(kind="exempt", ns=ns, gated=gated, ports=ports)
        if kind == "isolated":
            if rec is not None and rec.kind == "isolated" and rec.listing is not None:
                return rec
            await self.firewall.apply(ns, render.render_isolation(was=_in_table(rec)))
            return Enforced(
                kind="isolated",
                ns=ns,
                listing=await self.firewall.list_table(ns),
                gated=gated,
                ports=ports,
            )
        assert pol is not None and self.instr is not None
        referenced = render.referenced_sets(pol)
        sets = {name: self.instr.sets.get(name, []) for name in sorted(referenced)}
        log_rules = render.log_rules(self.instr.rules)
        if (
            rec is not None
            and rec.policy == pol
            and rec.log_rules == log_rules
            and rec.structure is not None
        ):
            structure = rec.structure  # same policy: rendering it again tells nothing new
        else:
            structure = render.set_structure_key(pol, log_rules)
        was, full = _in_table(rec), True
        if rec is not None and rec.kind == "workload" and rec.structure == structure:
            if rec.sets == sets:
                return rec
            delta = render.render_set_delta(rec.sets, sets, referenced)
            try:
                if delta:
                    await self.firewall.apply(ns, delta)
                full = False
            except NftError as e:
                # The table is not what we left (tampered, or a new namespace):
                # replace it whole instead.
                _log.warning("enforce.delta_failed", container=info.id[:12], error=str(e))
                was = None
        if full:
            await self.firewall.apply(ns, render.render_workload(pol, sets, log_rules, was=was))
        return Enforced(
            kind="workload",
            ns=ns,
            policy=pol,
            log_rules=log_rules,
            structure=structure,
            sets=sets,
            listing=await self.firewall.list_table(ns),
            gated=gated,
            ports=ports,
        )

    async def check_drift(self) -> list[str]:
        """Compare every namespace's table with what we applied; repair and report."""
        repaired: list[str] = []
        for cid in sorted(self.enforced):
            rec = self.enforced.get(cid)
            if rec is None or rec.kind == "exempt":
                continue
            async with self._kernel:
                try:
                    now = await self.firewall.list_table(rec.ns)
                except Exception as e:
                    _log.warning("drift.check_failed", container=cid[:12], error=repr(e))
                    continue
            if now == rec.listing:
                continue
            _log.warning("tamper.detected", container=cid[:12], table_present=now is not None)
            async with self._kernel:
                rec.structure = None  # forces a full replace, not a delta
                rec.listing = None
            await self._converge(cid)
            repaired.append(cid)
            self._spawn(
                self._report("tamper", cid, "namespace table changed outside segd; repaired")
            )
        if await self._gate_missing():
            _log.warning("tamper.gate", detail="host gate table missing; rebuilt")
            await self._rebuild_gate()
            self._spawn(self._report("tamper", "", "host gate table missing; rebuilt"))
        return repaired

    async def _gate_missing(self) -> bool:
        async with self._kernel:
            return await self.firewall.gate_list() is None

    async def _report(self, event: str, cid: str, detail: str) -> None:
        with contextlib.suppress(ServerUnavailable, Denied):
            await self.client.report(event, cid, detail)

    # ---- sidecars ----------------------------------------------------------------------

    def sidecars(self) -> list[SidecarIn]:
        """Every running container in another's namespace, with that container."""
        return [
            SidecarIn(container_id=cid, shares=role.owner, name=self.containers[cid].name)
            for cid, role in sorted(self.roles.items())
            if role.kind == "shares" and role.owner and cid in self.containers
        ]

    async def _push_sidecars(self) -> None:
        """Keep the server's list of this host's sidecars (`workload list`) current:
        the whole list, whenever it changed, once the server takes it."""
        backoff = Backoff(self.cfg.backoff_max_s)
        while True:
            await self._sidecars_changed.wait()
            self._sidecars_changed.clear()
            items = self.sidecars()
            if items == self._sidecars_sent:
                continue
            try:
                await self.client.sidecars(items)
            except ServerUnavailable as e:
                _log.warning("server.unavailable", op="sidecars", error=str(e))
                self._sidecars_changed.set()
                await backoff.wait(self._server_back)
                continue
            except Denied as e:  # told once; tried again when the list changes
                _log.warning("sidecars.refused", code=e.code, error=e.message)
            else:
                _log.info("sidecars.reported", sidecars=len(items))
            self._sidecars_sent = items
            backoff.reset()


def _ns_identity(path: str) -> NsId | None:
    """The identity of a namespace file; None when it cannot be read (gone, or
    not permitted)."""
    try:
        return stat_ns(path)
    except (NetnsError, OSError):
        return None
