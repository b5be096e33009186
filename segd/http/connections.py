"""Which connections a listener keeps: admission at accept, eviction, refusal.

Every accepted connection is counted from `accept()` to `close()` on its
socket, so TLS handshakes and connections aiohttp has not seen yet count too,
and the count is what the process really holds in file descriptors. At the
limit (`[*.connections] max_open`, lowered to what the open-files limit leaves
after `FD_RESERVE`), one more connection closes a victim: the connection
quiet the longest (no request in progress: new, handshaking, between
requests), else the one that has been sending its body the longest; never one
whose request is being handled. When there is none, the newcomer gets a 503
`busy` and is closed at once. A victim is shut down rather than closed, so the
event loop that owns its transport sees the end and closes it.

`ConnectionTable` is the bookkeeping and pure; `Guard` applies it to sockets;
`segd.http.listener` tells it what each connection is doing.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from typing import Any

import msgspec

from segd import log, wire
from segd.config import ConnectionLimits

_log = log.get("segd.http.listener")

FD_RESERVE = 256  # open files kept for the store, logs, subprocesses and accept bursts
REFUSALS_PER_WAKEUP = 64  # refused in one go before the event loop runs again
MAX_CLOSING = 64  # evicted connections not closed yet, at most (well within FD_RESERVE)
LOG_EVERY_S = 10.0  # at most one line about evictions and refusals this often

_BUSY_BODY = msgspec.json.encode(
    wire.Error(error="busy", message="the server holds too many connections; try again shortly")
)
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n" % len(_BUSY_BODY)
) + _BUSY_BODY


class ConnectionTable:
    """Open connections by file descriptor, and which one to close to admit another.

    A connection is *quiet* from its accept until a request starts and again
    after each answer, *reading* while a request's body arrives, and *busy*
    while a request is handled. A victim is the connection quiet the longest,
    else the one reading the longest; never a busy one.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._quiet: dict[int, None] = {}  # in the order they became quiet
        self._reading: dict[int, None] = {}
        self._busy: set[int] = set()
        self._closing: set[int] = set()  # victims not closed yet

    def __len__(self) -> int:
        return len(self._quiet) + len(self._reading) + len(self._busy) + len(self._closing)

    @property
    def full(self) -> bool:
        return len(self) - len(self._closing) >= self.limit

    @property
    def closing(self) -> int:
        """Victims whose file descriptors are not released yet."""
        return len(self._closing)

    def opened(self, fd: int) -> None:
        self._quiet[fd] = None

    def quiet(self, fd: int) -> None:
        if self._forget(fd):
            self._quiet[fd] = None

    def reading(self, fd: int) -> None:
        if self._forget(fd):
            self._reading[fd] = None

    def busy(self, fd: int) -> None:
        if self._forget(fd):
            self._busy.add(fd)

    def closed(self, fd: int) -> None:
        self._forget(fd)
        self._closing.discard(fd)

    def victim(self) -> int | None:
        """Take the connection to close (it is counted until `closed`), or None."""
        for pool in (self._quiet, self._reading):
            if pool:
                fd = next(iter(pool))
                del pool[fd]
                self._closing.add(fd)
                return fd
        return None

    def _forget(self, fd: int) -> bool:
        """Drop `fd` from its state; False when it is unknown or being closed."""
        if fd in self._quiet:
            del self._quiet[fd]
        elif fd in self._reading:
            del self._reading[fd]
        elif fd in self._busy:
            self._busy.remove(fd)
        else:
            return False
        return True


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one when allowed; (soft, hard) in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft, hard


def effective_max_open(wanted: int) -> int:
    """`wanted`, or less when the open-files limit leaves less after the reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, soft - FD_RESERVE))


class Guard:
    """The connections of one listener: admission at accept, states from the handlers."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.table = ConnectionTable(effective_max_open(limits.max_open))
        self._socks: dict[int, socket.socket] = {}
        self._evicted = self._refused = 0
        self._logged_at = 0.0
        if self.table.limit < limits.max_open:
            _log.warning(
                "listener.max_open_lowered",
                max_open=limits.max_open,
                allowed=self.table.limit,
                reason="open-files limit (raise LimitNOFILE)",
            )

    def admit(self, sock: socket.socket) -> bool:
        """Make room for `sock` if needed; False when it must be refused."""
        if self.table.full:
            # A victim's descriptor is released a loop iteration or two later:
            # while many are, refuse rather than run past the open-files limit.
            fd = self.table.victim() if self.table.closing < MAX_CLOSING else None
            if fd is None:
                self._refused += 1
                self._note()
                return False
            victim = self._socks.get(fd)
            if victim is not None:
                # Both directions: the transport sees the end, closes, and the fd is freed.
                with contextlib.suppress(OSError):
                    victim.shutdown(socket.SHUT_RDWR)
            self._evicted += 1
            self._note()
        self.table.opened(sock.fileno())
        self._socks[sock.fileno()] = sock
        return True

    def closed(self, fd: int) -> None:
        self.table.closed(fd)
        self._socks.pop(fd, None)

    def _note(self) -> None:
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            _log.warning(
                "listener.at_limit",
                open=len(self.table),
                max_open=self.table.limit,
                evicted=self._evicted,
                refused=self._refused,
            )
            self._logged_at = now
            self._evicted = self._refused = 0


class _Accepted(socket.socket):
    """An accepted connection that leaves its guard's table when closed."""

    guard: Guard | None = None

    def close(self) -> None:
        guard, self.guard = self.guard, None
        if guard is not None and self.fileno() >= 0:
            guard.closed(self.fileno())
        super().close()


class _GateSocket(socket.socket):
    """A listening socket whose accept admits, makes room, or refuses."""

    guard: Guard | None = None

    def accept(self) -> tuple[socket.socket, Any]:
        assert self.guard is not None
        for _ in range(REFUSALS_PER_WAKEUP):
            conn, addr = super().accept()  # BlockingIOError when nobody is waiting
            accepted = _Accepted(conn.family, conn.type, conn.proto, fileno=conn.detach())
            if self.guard.admit(accepted):
                accepted.guard = self.guard
                return accepted, addr
            _refuse(accepted)
        raise BlockingIOError


def _refuse(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(BUSY_RESPONSE)
        conn.shutdown(socket.SHUT_WR)
    conn.close()


def gate(sock: socket.socket, guard: Guard) -> socket.socket:
    """`sock` (bound, not yet listening) as a listening socket of `guard`."""
    g = _GateSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    g.guard = guard
    return g
