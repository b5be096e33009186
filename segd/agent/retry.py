"""One way to wait before trying again: capped, jittered exponential backoff.

Every retry loop of the agent (pairing and unpairing, the instructions
long-poll, the Docker event stream) uses `Backoff`. A wait can be cut short by
an event (the server was seen again): then a short random spread keeps the
hosts of a fleet from all coming back in the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

INITIAL_S = 0.2


class Backoff:
    """Delays of `initial`, doubling up to `maximum`, each drawn in [d/2, 3d/2)."""

    def __init__(
        self,
        maximum: float,
        *,
        initial: float = INITIAL_S,
        rand: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.initial = initial
        self.maximum = max(maximum, initial)
        self._delay = initial
        self._rand = rand

    @property
    def delay(self) -> float:
        """The base of the next wait (before jitter)."""
        return self._delay

    def next(self) -> float:
        """The next wait, jittered; the base doubles for the one after."""
        d = self._delay
        self._delay = min(d * 2, self.maximum)
        return self._rand(d / 2, d * 1.5)

    def reset(self) -> None:
        self._delay = self.initial

    async def wait(self, wake: asyncio.Event | None = None) -> None:
        """Sleep the next wait, or until `wake` is set, then a short spread."""
        d = self._delay
        pause = self.next()
        if wake is None:
            await asyncio.sleep(pause)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), pause)
            await asyncio.sleep(self._rand(0, min(1.0, d)))
