"""Wake-ups for long-polling agents: one event per host, set on a new version.

`publish(host, version)` records the host's latest version and wakes only that
host's waiters; `wait_newer(host, since, wait_s)` returns as soon as the
host's version is above `since`. Closing the hub releases every waiter, so a
shutting-down server does not hold connections for a full poll interval.
"""

from __future__ import annotations

import asyncio


class Hub:
    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._closed = False

    def version(self, host_id: str) -> int:
        return self._versions.get(host_id, 0)

    def publish(self, host_id: str, version: int) -> None:
        """Record `version` for the host and wake its waiters (versions never go back)."""
        if version <= self._versions.get(host_id, 0):
            return
        self._versions[host_id] = version
        ev = self._events.pop(host_id, None)
        if ev is not None:
            ev.set()

    async def wait_newer(self, host_id: str, since: int, wait_s: float) -> bool:
        """Wait until the host's version is above `since`; False on timeout or close."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while self._versions.get(host_id, 0) <= since:
            remaining = deadline - loop.time()
            if self._closed or remaining <= 0:
                return False
            ev = self._events.setdefault(host_id, asyncio.Event())
            try:
                async with asyncio.timeout(remaining):
                    await ev.wait()
            except TimeoutError:
                return False
        return True

    def close(self) -> None:
        """Release every waiter (they see a timeout)."""
        self._closed = True
        for ev in self._events.values():
            ev.set()
        self._events.clear()
