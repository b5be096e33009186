"""Network namespaces: opening them, and the one thread that is allowed to enter them.

`setns(2)` moves only the calling thread, so all namespace work runs on one
dedicated `Worker` thread, never on the event loop. The worker steps into a
namespace only for as long as it takes to bind something there (a libnftables
context, a netlink socket), then steps back to its home namespace. If
stepping back fails the thread is in an unknown namespace: it is marked
broken, refuses every later job with `WorkerBroken`, and its owner starts a
fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from segd import log as logging
from segd.firewall.kernel._errors import NamespaceGone, NetnsError, WorkerBroken
from segd.firewall.kernel._ffi import setns

THREAD_NS = "/proc/thread-self/ns/net"
INIT_NS = "/proc/1/ns/net"

log = logging.get(__name__)

T = TypeVar("T")


class _Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=_Closable)
NsId = tuple[int, int]
"""A namespace's identity: (st_dev, st_ino) of its nsfs file."""


def ns_id(st: os.stat_result) -> NsId:
    return (st.st_dev, st.st_ino)


def open_ns(path: str) -> tuple[int, NsId]:
    """Open a namespace file (`/proc/PID/ns/net`, `/run/netns/NAME`): (fd, id)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceGone(f"network namespace {path} does not exist") from None
    except OSError as e:
        raise NetnsError(f"cannot open network namespace {path}: {e.strerror}") from None
    return fd, ns_id(os.fstat(fd))


def stat_ns(path: str) -> NsId:
    try:
        return ns_id(os.stat(path))
    except FileNotFoundError:
        raise NamespaceGone(f"network namespace {path} does not exist") from None


def host_ids(home_fd: int, init_path: str = INIT_NS) -> frozenset[NsId]:
    """The host's namespace identities: `home_fd`'s (where this process lives)
    and init's, when it can be read (it cannot in every sandbox)."""
    ids = {ns_id(os.fstat(home_fd))}
    with contextlib.suppress(OSError):
        ids.add(ns_id(os.stat(init_path)))
    return frozenset(ids)


@dataclass
class _Job(Generic[T]):
    fn: Callable[[], T]
    fut: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class Worker:
    """A thread that runs jobs in order and may visit namespaces in between."""

    def __init__(self, home_fd: int, setns_fn: Callable[[int], None] = setns) -> None:
        self._home_fd = home_fd
        self._setns = setns_fn
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self.broken = False
        self._thread = threading.Thread(target=self._main, name="segd-netns", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Queue `fn` for the worker; the future resolves on the caller's loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(fn, fut, loop))
        return fut

    def stop(self) -> None:
        """Let the thread finish the queued jobs and exit."""
        self._jobs.put(None)

    @contextmanager
    def entered(self, fd: int) -> Iterator[None]:
        """On the worker: be inside the namespace `fd` for the `with` body."""
        if threading.current_thread() is not self._thread:
            raise RuntimeError("Worker.entered() called off the worker thread")
        try:
            self._setns(fd)
        except OSError as e:
            raise NetnsError(f"setns failed: {e.strerror}") from None
        try:
            yield
        finally:
            self._go_home()

    def made_in(self, fd: int, make: Callable[[], C]) -> C:
        """On the worker: `make()` run inside the namespace `fd`, so that what it
        opens (a libnftables context, a netlink socket) binds there.

        Does not keep `fd`. What was made is closed again if the worker cannot
        return home.
        """
        made: C | None = None
        try:
            with self.entered(fd):
                made = make()
        except BaseException:
            if made is not None:
                made.close()
            raise
        return made

    def _go_home(self) -> None:
        try:
            self._setns(self._home_fd)
        except OSError as e:
            self.broken = True
            log.error("netns.worker_broken", error=str(e))
            raise WorkerBroken(f"cannot return to the home namespace: {e.strerror}") from None

    def _main(self) -> None:
        with contextlib.suppress(WorkerBroken):
            self._go_home()  # a new thread inherits its creator's namespace; be sure
        while (job := self._jobs.get()) is not None:
            result: Any = None
            exc: BaseException | None = None
            if self.broken:
                exc = WorkerBroken("worker thread is broken")
            else:
                try:
                    result = job.fn()
                except BaseException as e:  # handed to the awaiting coroutine
                    exc = e
            # RuntimeError: the loop is closed and nobody is waiting.
            with contextlib.suppress(RuntimeError):
                job.loop.call_soon_threadsafe(_settle, job.fut, result, exc)
