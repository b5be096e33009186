"""The agent's one backoff: doubling, capped, jittered, reset, and woken early."""

from __future__ import annotations

import asyncio

from segd.agent.retry import Backoff


def _mid(lo: float, hi: float) -> float:
    return (lo + hi) / 2  # the jitter's centre: the base delay itself


def test_doubles_up_to_the_cap() -> None:
    b = Backoff(1.0, rand=_mid)
    assert [round(b.next(), 3) for _ in range(6)] == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


def test_jitter_bounds() -> None:
    lo = Backoff(10.0, rand=lambda a, b: a)
    hi = Backoff(10.0, rand=lambda a, b: b)
    assert (lo.next(), hi.next()) == (0.1, 0.30000000000000004)


def test_reset() -> None:
    b = Backoff(5.0, rand=_mid)
    b.next()
    b.next()
    assert b.delay == 0.8
    b.reset()
    assert b.delay == 0.2


def test_cap_below_initial_is_initial() -> None:
    b = Backoff(0.05, rand=_mid)
    assert [b.next(), b.next()] == [0.2, 0.2]


async def test_wake_cuts_the_wait_short() -> None:
    b = Backoff(60.0, initial=30.0, rand=lambda a, c: min(c, 0.01) if a == 0 else c)
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, wake.set)
    t0 = loop.time()
    await asyncio.wait_for(b.wait(wake), 5.0)  # would sleep ~45 s without the wake
    assert loop.time() - t0 < 5.0
    assert b.delay == 60.0  # the wait still counts as one step


async def test_no_wake_sleeps_the_drawn_pause() -> None:
    b = Backoff(1.0, rand=lambda a, c: 0.01)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await b.wait()
    assert loop.time() - t0 >= 0.01
