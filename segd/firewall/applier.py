"""The privileged applier: nftables scripts into container namespaces and the host gate.

`Firewall` is the async facade the agent uses. All kernel work runs on one
`netns.Worker` thread. Per namespace it keeps one nftables endpoint, created
inside that namespace and cached under the caller's key together with the
namespace's identity (device and inode of its nsfs file): when a container
restarts with a new namespace, the next call notices and binds a new one.
`forget` frees it (a libnftables context pins its namespace). A container's
path that leads into the host's own namespace (this process's, or init's) is
refused with `HostNamespace`, however it got there (a host-networked container,
one joined to it, a pid reused by a host process). `ports` reads a
namespace's addresses and veth peers over a short-lived rtnetlink socket
(`rtnl`) and keeps nothing.
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Protocol, TypeVar

from segd import log as logging
from segd.firewall import gate, netns, render, rtnl
from segd.firewall.netns import HostNamespace, NsId, Worker, WorkerBroken
from segd.firewall.nft import LibNft, NftBackend, NftError, NsenterNft, libnftables_available

log = logging.get(__name__)

T = TypeVar("T")
BackendName = Literal["libnftables", "nsenter", "auto"]

_ABSENT = "No such file or directory"


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
    """Apply and list `inet segd` in container namespaces; keep the host gate.

    `backend`: "libnftables" (in-process), "nsenter" (`nsenter ... nft -f -`),
    or "auto" (libnftables when it loads). `gate_ns`: path of the namespace
    that holds the gate; None is this process's own (the host). `setns_fn` is
    there to inject faults.
    """

    def __init__(
        self,
        backend: BackendName = "auto",
        *,
        gate_ns: str | None = None,
        setns_fn: Callable[[int], None] = netns.setns,
        max_open: int = 32,
    ) -> None:
        if backend not in ("libnftables", "nsenter", "auto"):
            raise ValueError(f"unknown nftables backend {backend!r}")
        have_lib = libnftables_available()
        if backend == "libnftables" and not have_lib:
            raise NftError("libnftables.so.1 cannot be loaded")
        self.backend: Literal["libnftables", "nsenter"] = (
            "libnftables" if backend != "nsenter" and have_lib else "nsenter"
        )
        self._gate_path = gate_ns
        self._setns = setns_fn
        self._home_fd: int | None = None
        self._worker: Worker | None = None
        self._sessions: dict[str, _Session] = {}
        self.max_open = max_open
        self._gate: _Session | None = None
        self._host_ns: frozenset[NsId] = frozenset()

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._worker is not None:
            return
        # Opened on the loop thread: the namespace this process (the host) lives in.
        self._home_fd = os.open(netns.THREAD_NS, os.O_RDONLY | os.O_CLOEXEC)
        self._host_ns = netns.host_ids(self._home_fd)
        self._worker = Worker(self._home_fd, self._setns)
        log.info("firewall.started", backend=self.backend, gate_ns=self._gate_path or "host")

    async def close(self) -> None:
        """Free every namespace endpoint and stop the worker; kernel state stays."""
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

    async def apply(self, ns: NsRef, script: str) -> None:
        """Run `script` in the namespace: all of it or (on NftError) none of it.

        A whole-table replace runs as `render.transactions` says, so that no
        packet slips through while the table is swapped.
        """

        def job(w: Worker) -> None:
            t0 = time.perf_counter()
            nft = self._session(w, ns)
            for tx in render.transactions(script):
                nft.run(tx)
            log.debug("firewall.applied", ns=ns.key, bytes=len(script), ms=_ms(t0))

        await self._run(job)

    async def list_table(self, ns: NsRef) -> str | None:
        """`list table inet segd` in the namespace; None when the table is absent."""
        return await self._run(lambda w: _list(self._session(w, ns), render.LIST_TABLE))

    async def forget(self, ns: NsRef) -> None:
        """Free the namespace's endpoint (the container is gone or restarted)."""

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

    # ---- host gate -----------------------------------------------------------------------

    async def gate_rebuild(
        self, entries: Iterable[tuple[str, str]], subnets: Iterable[str]
    ) -> None:
        """Make the gate exactly this, in one transaction, without a gap.

        `entries` are (port, ip) pairs: the host-side veth name and an address
        of the container behind it (see `ports`). A gate table of another shape
        (such as the IP-only one of earlier versions) is replaced whole, also
        without a gap (`gate.transactions`). Bad entries raise ValueError before
        anything is applied.
        """
        admitted, nets = list(entries), list(subnets)
        in_place = gate.render_gate(admitted, nets)
        try:
            await self._gate_apply(in_place)
        except NftError as e:
            # The table exists with other set or chain definitions: replace it.
            log.warning("firewall.gate_replaced", error=str(e))
            await self._gate_apply(gate.render_gate_replace(admitted, nets))

    async def gate_add(self, entries: Iterable[tuple[str, str]]) -> None:
        """Admit these (port, ip) pairs (idempotent)."""
        script = gate.render_gate_add(entries)
        if script is not None:
            await self._gate_apply(script)

    async def gate_remove(self, entries: Iterable[tuple[str, str]]) -> None:
        """Stop admitting these (port, ip) pairs (idempotent)."""
        script = gate.render_gate_remove(entries)
        if script is not None:
            await self._gate_apply(script)

    async def gate_set_subnets(self, subnets: Iterable[str]) -> None:
        await self._gate_apply(gate.render_gate_subnets(subnets))

    async def gate_list(self) -> str | None:
        """`list table bridge segd_gate`; None when the gate is absent."""
        return await self._run(lambda w: _list(self._gate_session(w), gate.LIST_GATE))

    async def _gate_apply(self, script: str) -> None:
        def job(w: Worker) -> None:
            t0 = time.perf_counter()
            nft = self._gate_session(w)
            for tx in gate.transactions(script):
                nft.run(tx)
            log.debug("firewall.gate_applied", bytes=len(script), ms=_ms(t0))

        await self._run(job)

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
        return _made_in(w, fd, LibNft)

    def _ensure(self, w: Worker, have: _Session | None, path: str | None) -> _Session:
        """`have` if it still points at `path`'s namespace, else a fresh endpoint."""
        fd: int | None = None
        nsid: NsId | None = None
        try:
            if have is not None and (path is None or have.ns == netns.stat_ns(path)):
                return have
            if path is not None:
                fd, nsid = netns.open_ns(path)
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
        home_fd = self._home_fd
        fd, _ = netns.open_ns(path)
        try:
            sock = _made_in(w, fd, rtnl.Rtnl)
        finally:
            os.close(fd)
        gate_fd: int | None = None
        try:
            with sock:
                if self._gate_path is not None:
                    gate_fd, _ = netns.open_ns(self._gate_path)
                links = sock.links()
                addresses = sock.addresses()
                # Asked after the link dump, which assigns ids to the peers' namespaces.
                gate_id = sock.nsid(home_fd if gate_fd is None else gate_fd)
            peers = {
                link.index: link.peer
                for link in links
                if link.kind == "veth" and link.peer is not None and link.peer_netnsid == gate_id
            }
            names = _if_names(w, gate_fd, set(peers.values()))
        finally:
            if gate_fd is not None:
                os.close(gate_fd)
        found: dict[str, str] = {}
        for a in sorted(addresses, key=lambda a: a.index):
            peer = peers.get(a.index)
            name = None if peer is None else names.get(peer)
            if name is None or not gate.PORT_RE.match(name):
                continue
            if a.scope >= rtnl.RT_SCOPE_LINK or a.ip.is_loopback or a.ip.is_link_local:
                continue
            found.setdefault(str(a.ip), name)
        return found

    def _close_all(self) -> None:
        sessions = list(self._sessions.values())
        if self._gate is not None:
            sessions.append(self._gate)
        self._sessions.clear()
        self._gate = None
        for s in sessions:
            s.nft.close()


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)


def _made_in(w: Worker, fd: int, make: Callable[[], C]) -> C:
    """`make()` run inside the namespace `fd`, so that what it opens binds there.

    Does not keep `fd`. Closed again if the worker cannot return home.
    """
    made: C | None = None
    try:
        with w.entered(fd):
            made = make()
    except BaseException:
        if made is not None:
            made.close()
        raise
    return made


_last_trim = 0.0


def _malloc_trim() -> None:
    """Return freed heap to the system (glibc; at most once a second)."""
    global _last_trim
    now = time.monotonic()
    libc = _libc()
    if libc is not None and now - _last_trim >= 1.0:
        _last_trim = now
        libc.malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def _if_names(w: Worker, fd: int | None, indexes: set[int]) -> dict[int, str]:
    """Interface names by index in the namespace `fd` (None: home); gone ones left out."""

    def lookup() -> dict[int, str]:
        names: dict[int, str] = {}
        for index in indexes:
            try:
                names[index] = socket.if_indextoname(index)
            except OSError:
                continue
        return names

    if not indexes:
        return {}
    if fd is None:
        return lookup()  # the worker is at home between jobs
    with w.entered(fd):
        return lookup()


def _list(nft: NftBackend, command: str) -> str | None:
    try:
        return nft.run(command)
    except NftError as e:
        if _ABSENT in str(e):
            return None
        raise
