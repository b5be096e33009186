"""Wake-ups for long-polling agents: one event per host, set when its version changes.

The versions themselves are the publisher's. `wake(host)` releases only that
host's waiters; `wait(host, ready, wait_s)` returns as soon as `ready()` holds.
Closing the hub releases every waiter, so a shutting-down server does not hold
connections for a full poll interval.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Hub:
    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._closed = False
        self.waiting = 0  # long-polls waiting now

    def wake(self, host_id: str) -> None:
        ev = self._events.pop(host_id, None)
        if ev is not None:
            ev.set()

    async def wait(self, host_id: str, ready: Callable[[], bool], wait_s: float) -> bool:
        """Wait until `ready()` (checked at each wake of the host); False on timeout
        or close."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while not ready():
            remaining = deadline - loop.time()
            if self._closed or remaining <= 0:
                return False
            ev = self._events.setdefault(host_id, asyncio.Event())
            self.waiting += 1
            try:
                async with asyncio.timeout(remaining):
                    await ev.wait()
            except TimeoutError:
                return False
            finally:
                self.waiting -= 1
        return True

    def close(self) -> None:
        """Release every waiter (they see a timeout)."""
        self._closed = True
        for ev in self._events.values():
            ev.set()
        self._events.clear()
