"""The root module: the only code in segd that enters namespaces or talks to nftables.

Everything that needs root goes through here, as a few verbs on `Firewall`:

- `apply(ns, plan)` / `gate_apply(plan)`: run a `Plan` (from the pure
  renderers `render` and `gate`) in a container's namespace / the gate's;
- `list_table(ns)` / `gate_list()`: a table's listing, None when absent;
- `ports(ns)`: a namespace's addresses and the bridge ports behind them;
- `forget(ns)`: free what is kept for a namespace (and close its log reader
  and connection counter);
- `conntrack_dump()`: the connections of every counted namespace, with their
  running counters;

the segd mesh's interface, routes and `DOCKER-USER` accepts (`_mesh`:
`WireGuardLink`, `apply_routes`, `docker_user`, ...);

and two functions for a process about to do kernel work: `unavailable()`
says why it cannot (or None), `take_host_lock()` makes it the host's only
agent.

All kernel work runs on one worker thread (`_worker`). Per namespace it keeps
one nftables endpoint (`_nft`: a libnftables context from `_ffi`, or the
`nsenter ... nft -f -` fallback), created inside that namespace and cached
under the caller's key together with the namespace's identity (device and
inode of its nsfs file): when a container restarts with a new namespace, the
next call notices and binds a new one. `forget` frees it (a libnftables
context pins its namespace). A container's path that leads into the host's
own namespace (this process's, or init's) is refused with `HostNamespace`,
however it got there (a host-networked container, one joined to it, a pid
reused by a host process). `ports` reads a namespace's addresses and veth
peers over a short-lived rtnetlink socket (`_rtnl`) and keeps nothing.

With `on_log`, a container namespace that gets a table that logs (a workload's
or an isolation table: `render.LOGGING_PLANS`) also gets an
NFLOG reader (`_nflog`) bound to `nflog.GROUP`, made on the worker inside the
namespace right after the table is applied, read on the event loop, and closed
by `forget` (the container died or restarted) or `close`. A reader that cannot
bind (a process in the container holds the group) is logged and left out:
enforcement never waits for visibility. A reader is read for at most
`log_budget` packets a second (segd's own rules log far fewer): a namespace
that logs more to the group is left unread for the rest of that second, its
excess dropped by the kernel and counted as overruns. The gate's namespace gets one too
once the gate is built; its packets come with the key `nflog.GATE_LOG_KEY`.

With `on_count`, a container namespace whose plan `counts` (a workload at
visibility level `enhanced`) also gets a connection counter (`_conntrack`),
made on the worker inside the namespace right after the table is applied: it
turns conntrack accounting on there and listens for destroy events, read on
the event loop and handed to `on_count` with each ended connection's final
packets and bytes, and how many destroy events the kernel dropped (overruns),
at most `log_budget` connections a second (a namespace ending more is left
unread for the rest of that second, as a log reader is). Connections still
open are read by `conntrack_dump`, off the loop; a dump also reaps entries
that timed out, whose destroy events follow (the kernel's own reaping may take
a minute; a closed TCP connection stays tracked for
`nf_conntrack_tcp_timeout_time_wait`, 120 s by default). A counter is kept per
key with its namespace's identity (a new namespace gets a new one), and closed
by `forget`, by `close`, and by a later whole-table plan
(`render.TABLE_PLANS`) that does not count; a set delta leaves it. One that
cannot be made (no conntrack in the kernel) is logged and left out, like a log
reader; destroy events the kernel dropped for it (overruns) go to `on_count`.

The underscored submodules are private to this package; `_ffi` is the only
module in segd that imports ctypes.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, TypeVar

from segd import log as logging
from segd.firewall.conntrack import CtEntry
from segd.firewall.gate import GATE, GATE_PLANS
from segd.firewall.kernel import _ffi, _worker
from segd.firewall.kernel._conntrack import ConnCounter
from segd.firewall.kernel._errors import (
    HostNamespace,
    NamespaceGone,
    NetnsError,
    NftError,
    WorkerBroken,
)
from segd.firewall.kernel._host import BackendName, take_host_lock, unavailable
from segd.firewall.kernel._mesh import (
    MeshError,
    WireGuardLink,
    apply_routes,
    docker_user,
    kernel_has_wireguard,
    link_exists,
    pool_routes,
    remove_pool_route,
    wireguard_go,
)
from segd.firewall.kernel._nflog import Reader
from segd.firewall.kernel._nft import LibNft, NftBackend, NsenterNft
from segd.firewall.kernel._ports import read_ports
from segd.firewall.kernel._watched import Watched
from segd.firewall.kernel._worker import NsId, Worker, stat_ns
from segd.firewall.nflog import GATE_LOG_KEY, GROUP, LogPacket
from segd.firewall.plan import Plan, Table
from segd.firewall.render import CONTAINER, LOGGING_PLANS, TABLE_PLANS

__all__ = [
    "BackendName",
    "CtEntry",
    "Firewall",
    "HostNamespace",
    "LogPacket",
    "MeshError",
    "NamespaceGone",
    "NetnsError",
    "NftError",
    "NsId",
    "NsRef",
    "OnCount",
    "OnLog",
    "WireGuardLink",
    "WorkerBroken",
    "apply_routes",
    "docker_user",
    "kernel_has_wireguard",
    "link_exists",
    "pool_routes",
    "remove_pool_route",
    "stat_ns",
    "take_host_lock",
    "unavailable",
    "wireguard_go",
]

log = logging.get(__name__)

T = TypeVar("T")

_ABSENT = "No such file or directory"

OnLog = Callable[[str, list[LogPacket], int], None]
"""Called on the loop with a namespace's key, packets its table logged, and
how many overruns its reader saw since the last call."""

OnCount = Callable[[str, list[CtEntry], int], None]
"""Called on the loop with a namespace's key and connections of it that ended,
with their final counters."""


@dataclass(frozen=True)
class NsRef:
    """A container's network namespace: a cache key and a path to open."""

    key: str  # container id or name
    path: str  # /proc/PID/ns/net or /run/netns/NAME


@dataclass
class _Session:
    ns: NsId | None  # None: the worker's home namespace
    nft: NftBackend


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


class Firewall:
    """Run plans in container namespaces and in the gate's; list tables; read ports.

    `backend`: "libnftables" (in-process), "nsenter" (`nsenter ... nft -f -`),
    or "auto" (libnftables when it loads). `gate_ns`: path of the namespace
    that holds the gate; None is this process's own (the host).
    `setns_fault`, for tests, is called before every `setns` and may raise
    OSError to make it fail.
    """

    def __init__(
        self,
        backend: BackendName = "auto",
        *,
        gate_ns: str | None = None,
        setns_fault: Callable[[int], None] | None = None,
        max_open: int = 32,
        on_log: OnLog | None = None,
        log_budget: int = 5000,
        on_count: OnCount | None = None,
    ) -> None:
        if backend not in ("libnftables", "nsenter", "auto"):
            raise ValueError(f"unknown nftables backend {backend!r}")
        have_lib = _ffi.libnftables_available()
        if backend == "libnftables" and not have_lib:
            raise NftError(f"{_ffi.LIBNFTABLES} cannot be loaded")
        self.backend: Literal["libnftables", "nsenter"] = (
            "libnftables" if backend != "nsenter" and have_lib else "nsenter"
        )
        self._gate_path = gate_ns
        self._setns = _ffi.setns if setns_fault is None else _faulty(setns_fault)
        self._home_fd: int | None = None
        self._worker: Worker | None = None
        self._sessions: dict[str, _Session] = {}
        self.max_open = max_open
        self._gate: _Session | None = None
        self._host_ns: frozenset[NsId] = frozenset()
        self._on_log = on_log
        self.log_budget = log_budget  # logged packets a namespace is read for, a second
        self._readers: Watched[Reader, LogPacket] = Watched("log", lambda: self.log_budget, on_log)
        self._on_count = on_count
        self._counters: Watched[ConnCounter, CtEntry] = Watched(
            "count", lambda: self.log_budget, on_count
        )

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._worker is not None:
            return
        # Opened on the loop thread: the namespace this process (the host) lives in.
        self._home_fd = os.open(_worker.THREAD_NS, os.O_RDONLY | os.O_CLOEXEC)
        self._host_ns = _worker.host_ids(self._home_fd)
        self._worker = Worker(self._home_fd, self._setns)
        log.info("firewall.started", backend=self.backend, gate_ns=self._gate_path or "host")

    async def close(self) -> None:
        """Free every namespace endpoint and stop the worker; kernel state stays."""
        self._readers.close_all()
        self._counters.close_all()
        if self._worker is None:
            return
        try:
            await self._run(lambda _w: self._close_all())
        finally:
            if self._worker is not None:
                self._worker.stop()
                self._worker = None
            if self._home_fd is not None:
                os.close(self._home_fd)
                self._home_fd = None

    async def __aenter__(self) -> Firewall:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def host_namespaces(self) -> frozenset[NsId]:
        """The host's namespace identities; no container table goes into one."""
        return self._host_ns

    @property
    def open_namespaces(self) -> int:
        """How many container namespaces have a cached endpoint."""
        return len(self._sessions)

    # ---- container namespaces -----------------------------------------------------------

    async def apply(self, ns: NsRef, plan: Plan) -> None:
        """Run `plan` in the namespace (see `Plan` for what a refusal leaves).

        Raises NftError when nft refuses a transaction (after the fallback, if
        the plan has one), `NamespaceGone` when the namespace no longer exists.
        """
        await self._run(lambda w: _run_plan(self._session(w, ns), plan, ns.key))
        if self._on_log is not None and plan.what in LOGGING_PLANS:
            await self._ensure_reader(ns)
        if self._on_count is not None and plan.what in TABLE_PLANS:
            if plan.counts:
                await self._ensure_counter(ns)
            else:
                self._counters.close(ns.key)

    async def list_table(self, ns: NsRef, table: Table = CONTAINER) -> str | None:
        """`list table` in the namespace (stateless); None when the table is absent."""
        command = table.check().list_command
        return await self._run(lambda w: _list(self._session(w, ns), command))

    async def forget(self, ns: NsRef) -> None:
        """Free the namespace's endpoint (the container is gone or restarted)."""
        self._readers.close(ns.key)
        self._counters.close(ns.key)

        def job(_w: Worker) -> None:
            s = self._sessions.pop(ns.key, None)
            if s is not None:
                s.nft.close()
                _malloc_trim()
                log.debug("firewall.forgot", ns=ns.key)

        await self._run(job)

    async def ports(self, ns: NsRef) -> dict[str, str]:
        """The namespace's addresses, each with the gate-side name of the veth behind it.

        For every veth in the namespace whose peer lives in the gate's namespace
        (the host, or `gate_ns`), each of its IPv4 and IPv6 addresses maps to
        the peer's name: the bridge port to admit that address on. Skipped:
        loopback and link-local addresses; links that are not veths (macvlan,
        ipvlan, dummy: their IFLA_LINK is a parent, not a port); veths whose
        peer is elsewhere (e.g. both ends in the container); peers the gate does
        not look at (not `veth*`). An address on two such links maps to the one
        with the lower index. ~0.3 ms; no nftables endpoint is made.

        The container owns its namespace: with CAP_NET_ADMIN it can put any
        address on its interface. Use this to find the port of the addresses
        Docker assigned, never to learn which addresses to admit.
        Raises `NamespaceGone` when the namespace no longer exists.
        """

        def job(w: Worker) -> dict[str, str]:
            t0 = time.perf_counter()
            found = self._ports(w, ns.path)
            log.debug("firewall.ports", ns=ns.key, ports=found, ms=_ms(t0))
            return found

        return await self._run(job)

    @property
    def log_readers(self) -> int:
        """How many namespaces (containers', and the gate's) have an NFLOG reader open."""
        return len(self._readers)

    # ---- log readers (on the loop) ---------------------------------------------------------

    async def _ensure_reader(self, ns: NsRef) -> None:
        try:
            nsid = _worker.stat_ns(ns.path)
        except (NamespaceGone, OSError):
            return
        await self._reader(ns.key, ns.path, nsid)

    async def _ensure_gate_reader(self) -> None:
        if self._home_fd is None:
            return
        try:
            path = self._gate_path
            nsid = _worker.ns_id(os.fstat(self._home_fd)) if path is None else _worker.stat_ns(path)
        except (NamespaceGone, OSError):
            return
        await self._reader(GATE_LOG_KEY, path, nsid)

    async def _reader(self, key: str, path: str | None, nsid: NsId) -> None:
        """An NFLOG reader for the namespace at `path` (None: the worker's home)."""
        if self._readers.has(key, nsid):
            return
        self._readers.close(key)

        def job(w: Worker) -> Reader:
            if path is None:
                return Reader(GROUP)  # the worker is at home between jobs
            fd, _ = _worker.open_ns(path)
            try:
                return w.made_in(fd, lambda: Reader(GROUP))
            finally:
                os.close(fd)

        try:
            reader = await self._run(job)
        except (OSError, NetnsError) as e:
            log.warning("firewall.log_reader_failed", ns=key or "gate", error=str(e))
            return
        self._readers.watch(key, nsid, reader)
        log.debug("firewall.log_reader", ns=key or "gate")

    # ---- connection counters (on the loop) --------------------------------------------------

    @property
    def counters(self) -> int:
        """How many container namespaces have a connection counter open."""
        return len(self._counters)

    async def conntrack_dump(self) -> dict[str, list[CtEntry]]:
        """The connections of every counted namespace now, with running counters.

        Dumps run off the loop, side by side; a namespace whose dump fails is
        logged and left out, as is one whose counter closed meanwhile.
        """
        counted = list(self._counters.items())
        results = await asyncio.gather(
            *(asyncio.to_thread(c.dump) for _, c in counted), return_exceptions=True
        )
        out: dict[str, list[CtEntry]] = {}
        for (key, counter), got in zip(counted, results, strict=True):
            if isinstance(got, OSError):
                log.warning("firewall.conntrack_dump_failed", ns=key, error=str(got))
            elif isinstance(got, BaseException):
                raise got
            elif self._counters.current(key, counter):
                out[key] = got
        return out

    async def _ensure_counter(self, ns: NsRef) -> None:
        try:
            nsid = _worker.stat_ns(ns.path)
        except (NamespaceGone, OSError):
            return
        if self._counters.has(ns.key, nsid):
            return
        self._counters.close(ns.key)

        def job(w: Worker) -> ConnCounter:
            fd, _ = _worker.open_ns(ns.path)
            try:
                return w.made_in(fd, ConnCounter)
            finally:
                os.close(fd)

        try:
            counter = await self._run(job)
        except (OSError, NetnsError) as e:
            log.warning("firewall.conn_counter_failed", ns=ns.key, error=str(e))
            return
        self._counters.watch(ns.key, nsid, counter)  # one made meanwhile is closed
        log.debug("firewall.conn_counter", ns=ns.key)

    # ---- the gate's namespace -----------------------------------------------------------

    async def gate_apply(self, plan: Plan) -> None:
        """Run `plan` in the gate's namespace (the host's, or `gate_ns`)."""
        await self._run(lambda w: _run_plan(self._gate_session(w), plan, "gate"))
        if self._on_log is not None and plan.what in GATE_PLANS:
            await self._ensure_gate_reader()

    async def gate_list(self, table: Table = GATE) -> str | None:
        """`list table` in the gate's namespace; None when the table is absent."""
        command = table.check().list_command
        return await self._run(lambda w: _list(self._gate_session(w), command))

    # ---- on the worker -------------------------------------------------------------------

    async def _run(self, job: Callable[[Worker], T]) -> T:
        """Run `job` on the worker; replace a broken worker and retry once."""
        for attempt in (1, 2):
            worker = self._worker
            if worker is None or self._home_fd is None:
                raise RuntimeError("Firewall is not started")
            try:
                return await worker.submit(functools.partial(job, worker))
            except WorkerBroken:
                if self._worker is worker:
                    worker.stop()
                    self._worker = Worker(self._home_fd, self._setns)
                    log.warning("firewall.worker_replaced")
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _open(self, w: Worker, fd: int | None) -> NftBackend:
        """An endpoint in the namespace `fd` (None: home). Does not keep `fd`."""
        if self.backend == "nsenter":
            dup = None if fd is None else os.dup(fd)
            try:
                return NsenterNft(dup)
            except BaseException:
                if dup is not None:
                    os.close(dup)
                raise
        if fd is None:
            return LibNft()  # the worker is at home between jobs
        return w.made_in(fd, LibNft)

    def _ensure(self, w: Worker, have: _Session | None, path: str | None) -> _Session:
        """`have` if it still points at `path`'s namespace, else a fresh endpoint."""
        fd: int | None = None
        nsid: NsId | None = None
        try:
            if have is not None and (path is None or have.ns == _worker.stat_ns(path)):
                return have
            if path is not None:
                fd, nsid = _worker.open_ns(path)
        except BaseException:
            if have is not None:
                have.nft.close()
            raise
        if have is not None:
            have.nft.close()
            log.info("firewall.netns_changed", path=path)
        try:
            return _Session(nsid, self._open(w, fd))
        finally:
            if fd is not None:
                os.close(fd)

    def _session(self, w: Worker, ns: NsRef) -> NftBackend:
        s = self._ensure(w, self._sessions.pop(ns.key, None), ns.path)
        if s.ns is None or s.ns in self._host_ns:
            s.nft.close()
            log.error("firewall.host_namespace_refused", ns=ns.key, path=ns.path)
            raise HostNamespace(f"{ns.path} is the host's network namespace")
        self._sessions[ns.key] = s  # most recently used last
        self._evict()
        return s.nft

    def _evict(self) -> None:
        """Keep at most `max_open` endpoints: a libnftables context costs ~0.7 MiB
        once used. The least recently used are freed (and rebound on next use);
        freed heap goes back to the system."""
        if len(self._sessions) <= self.max_open:
            return
        while len(self._sessions) > self.max_open:
            key = next(iter(self._sessions))
            self._sessions.pop(key).nft.close()
        _malloc_trim()

    def _gate_session(self, w: Worker) -> NftBackend:
        have, self._gate = self._gate, None
        self._gate = self._ensure(w, have, self._gate_path)
        return self._gate.nft

    def _ports(self, w: Worker, path: str) -> dict[str, str]:
        if self._home_fd is None:
            raise RuntimeError("Firewall is not started")
        return read_ports(w, path, self._home_fd, self._gate_path)

    def _close_all(self) -> None:
        sessions = list(self._sessions.values())
        if self._gate is not None:
            sessions.append(self._gate)
        self._sessions.clear()
        self._gate = None
        for s in sessions:
            s.nft.close()


def _faulty(fault: Callable[[int], None]) -> Callable[[int], None]:
    def setns(fd: int) -> None:
        fault(fd)
        _ffi.setns(fd)

    return setns


def _run_plan(nft: NftBackend, plan: Plan, where: str) -> None:
    """Run the plan's transactions in order; its fallback if the first is refused."""
    t0 = time.perf_counter()
    for i, tx in enumerate(plan.txs):
        try:
            nft.run(tx)
        except NftError as e:
            if i > 0 or plan.fallback is None:
                raise
            log.warning(
                "firewall.fallback",
                ns=where,
                plan=plan.what,
                fallback=plan.fallback.what,
                error=str(e),
            )
            _run_plan(nft, plan.fallback, where)
            return
    log.debug("firewall.applied", ns=where, plan=plan.what, txs=len(plan.txs), ms=_ms(t0))


_last_trim = 0.0


def _malloc_trim() -> None:
    """Return freed heap to the system (at most once a second)."""
    global _last_trim
    now = time.monotonic()
    if now - _last_trim >= 1.0:
        _last_trim = now
        _ffi.malloc_trim()


def _list(nft: NftBackend, command: str) -> str | None:
    try:
        return nft.run(command)
    except NftError as e:
        if _ABSENT in str(e):
            return None
        raise
