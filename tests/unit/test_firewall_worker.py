"""The namespace worker thread (private to `segd.firewall.kernel`), with a recorded
`setns` (no root needed)."""

from __future__ import annotations

import asyncio
import functools
import threading

import pytest

from segd.firewall.kernel import NetnsError, WorkerBroken
from segd.firewall.kernel._worker import Worker

HOME = 1000


class FakeSetns:
    """Records the namespace each thread is in; can refuse chosen targets."""

    def __init__(self, refuse: set[int] | None = None) -> None:
        self.where: dict[int, int] = {}
        self.refuse = refuse or set()

    def __call__(self, fd: int) -> None:
        if fd in self.refuse:
            raise OSError(1, "Operation not permitted")
        self.where[threading.get_ident()] = fd


async def test_jobs_run_in_order_off_the_loop_thread() -> None:
    w = Worker(HOME, FakeSetns())
    try:
        loop_thread = threading.get_ident()
        seen: list[int] = []

        def job(i: int) -> int:
            seen.append(i)
            return threading.get_ident()

        futs = [w.submit(functools.partial(job, i)) for i in range(50)]
        threads = set(await asyncio.gather(*futs))
        assert seen == list(range(50))
        assert len(threads) == 1
        assert loop_thread not in threads
    finally:
        w.stop()


async def test_job_exceptions_reach_the_caller() -> None:
    w = Worker(HOME, FakeSetns())
    try:
        with pytest.raises(ZeroDivisionError):
            await w.submit(lambda: 1 // 0)
        assert await w.submit(lambda: 42) == 42
    finally:
        w.stop()


async def test_entered_goes_home_afterwards() -> None:
    fake = FakeSetns()
    w = Worker(HOME, fake)
    try:

        def job() -> tuple[int, int]:
            with w.entered(7):
                inside = fake.where[threading.get_ident()]
            return inside, fake.where[threading.get_ident()]

        assert await w.submit(job) == (7, HOME)
        with pytest.raises(RuntimeError, match="off the worker thread"), w.entered(7):
            pass
    finally:
        w.stop()


async def test_failed_enter_leaves_the_worker_usable() -> None:
    w = Worker(HOME, FakeSetns(refuse={7}))
    try:

        def job() -> None:
            with w.entered(7):
                raise AssertionError("must not run")

        with pytest.raises(NetnsError, match="setns failed"):
            await w.submit(job)
        assert not w.broken
        assert await w.submit(lambda: "ok") == "ok"
    finally:
        w.stop()


async def test_failed_return_breaks_the_worker_for_good() -> None:
    fake = FakeSetns()
    w = Worker(HOME, fake)
    try:

        def job() -> None:
            with w.entered(7):
                fake.refuse.add(HOME)

        first, queued = w.submit(job), w.submit(lambda: "later")
        with pytest.raises(WorkerBroken):
            await first
        assert w.broken
        with pytest.raises(WorkerBroken):  # already queued: refused, not run in the wrong netns
            await queued
        with pytest.raises(WorkerBroken):
            await w.submit(lambda: "after")
    finally:
        w.stop()


class Handle:
    """Something bound to a namespace when made (a context, a socket)."""

    def __init__(self, fake: FakeSetns) -> None:
        self.made_in = fake.where[threading.get_ident()]
        self.closed = False

    def close(self) -> None:
        self.closed = True


async def test_made_in_binds_inside_and_returns_home() -> None:
    fake = FakeSetns()
    w = Worker(HOME, fake)
    try:

        def job() -> tuple[int, int]:
            h = w.made_in(7, lambda: Handle(fake))
            return h.made_in, fake.where[threading.get_ident()]

        assert await w.submit(job) == (7, HOME)
    finally:
        w.stop()


async def test_made_in_closes_what_it_made_when_it_cannot_return_home() -> None:
    fake = FakeSetns()
    w = Worker(HOME, fake)
    made: list[Handle] = []
    try:

        def make() -> Handle:
            made.append(Handle(fake))
            fake.refuse.add(HOME)
            return made[-1]

        with pytest.raises(WorkerBroken):
            await w.submit(lambda: w.made_in(7, make))
        assert [h.closed for h in made] == [True]
    finally:
        w.stop()
