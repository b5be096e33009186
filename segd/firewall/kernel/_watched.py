"""Per-namespace netlink sources read on the event loop within a budget.

The NFLOG readers and the conntrack counters work alike: one source per
namespace key, read whenever its socket is readable, what it read handed to
the owner's callback with the overruns since the last read, and no more than
`budget()` items read a second: past that, the source is not read for the rest
of the second and the kernel drops the excess, counted as overruns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

from segd import log as logging
from segd.firewall.kernel._worker import NsId

log = logging.get("segd.firewall.kernel")

T = TypeVar("T")


class Source(Protocol[T]):
    """`_nflog.Reader` or `_conntrack.ConnCounter`."""

    lost: int  # overruns so far
    window: float  # when its current second of reading began (monotonic)
    taken: int  # what was read in it

    def fileno(self) -> int: ...
    def drain(self) -> list[T]: ...
    def close(self) -> None: ...


S = TypeVar("S", bound=Source[Any])


class Watched(Generic[S, T]):
    """The sources of one kind (`what`: "log" or "count", in log event names).
    Touched on the loop only."""

    def __init__(
        self,
        what: str,
        budget: Callable[[], int],
        deliver: Callable[[str, list[T], int], None] | None,
    ) -> None:
        self._what = what
        self._budget = budget
        self._deliver = deliver
        self._kept: dict[str, tuple[NsId, S]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def has(self, key: str, nsid: NsId) -> bool:
        """Whether `key` has a source for the namespace `nsid` (not an older one's)."""
        have = self._kept.get(key)
        return have is not None and have[0] == nsid

    def current(self, key: str, src: S) -> bool:
        """Whether `src` is still the source kept under `key`."""
        have = self._kept.get(key)
        return have is not None and have[1] is src

    def items(self) -> Iterator[tuple[str, S]]:
        return ((key, src) for key, (_, src) in list(self._kept.items()))

    def watch(self, key: str, nsid: NsId, src: S) -> None:
        """Keep and read `src` for `key` (one made meanwhile is closed)."""
        self.close(key)
        self._kept[key] = (nsid, src)
        asyncio.get_running_loop().add_reader(src.fileno(), self._drain, key, src)

    def close(self, key: str) -> None:
        have = self._kept.pop(key, None)
        if have is not None:
            asyncio.get_running_loop().remove_reader(have[1].fileno())
            have[1].close()

    def close_all(self) -> None:
        for key in list(self._kept):
            self.close(key)

    def _drain(self, key: str, src: S) -> None:
        lost = src.lost
        try:
            got: list[T] = src.drain()
        except OSError as e:
            log.warning(f"firewall.{self._what}_read_failed", ns=key, error=str(e))
            self.close(key)
            return
        if (got or src.lost != lost) and self._deliver is not None:
            self._deliver(key, got, src.lost - lost)
        self._pace(key, src, len(got))

    def _pace(self, key: str, src: S, n: int) -> None:
        """Count `n` read from `src` this second; past the budget it is not read for
        the rest of the second (a namespace may log to our group with rules of its
        own). Read again then if it is still the one kept under `key`."""
        now = time.monotonic()
        if now - src.window >= 1.0:
            src.window, src.taken = now, 0
        src.taken += n
        if src.taken < self._budget():
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(src.fileno())
        loop.call_later(src.window + 1.0 - now, self._resume, key, src)
        log.warning(f"firewall.{self._what}_paused", ns=key, read=src.taken)

    def _resume(self, key: str, src: S) -> None:
        if self.current(key, src):
            asyncio.get_running_loop().add_reader(src.fileno(), self._drain, key, src)
