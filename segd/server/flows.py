"""Flows: what agents report, kept, listed, exported and streamed live.

`Flows.ingest` paces batches (`[server.flows] max_records_per_s`; the bucket
holds at least one full batch, so any batch gets its turn), lets the pairings
being answered go first, checks a host's batch (`flowresolve.check`: a bad one
is refused whole, and gives its turn back), resolves each record by the
compiler's model of workloads (`flowresolve.resolve`), writes the batch to the
flow store in one transaction of its own file (never the store that pairs; a
batch sent again is not kept twice) and hands the new flows to the live
streams. A host revoked while its batch waited is refused before anything is
written. A stream whose reader falls behind loses flows, and is told how many
(so is one ended with a full queue). Counters (`ingested`, `lost`, `refused`,
`repeated`) feed the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator

from segd import log, wire
from segd.config import FlowsConfig
from segd.errors import InvalidInput, SegdError
from segd.server import flowresolve
from segd.server.core import Core
from segd.server.flowpace import Pacer
from segd.server.flowquery import FlowFilter
from segd.server.flowstore import FlowStore, cursor_of, parse_cursor

_log = log.get("segd.server.flows")

STREAM_QUEUE = 1024
MAX_WAIT_S = 10.0  # a batch waits its turn at most this long
MAX_WAITING = 64  # batches waiting their turn at once
BURST_S = 2.0  # the pacer's bucket holds this many seconds of records
PAIRING_FIRST_S = 0.25  # a chunk of a batch waits this long at most for pairings
YIELD_EVERY = 256  # records resolved between two turns of the event loop
EXPORT_PAGE = 1000
HOUR_S = 3600.0
DAY_S = 86400.0
BATCH_NAMES_KEPT_S = DAY_S  # a batch sent again later than this would be kept again


class InFlight:
    """How many requests of a kind are being answered; `idle()` returns when none is."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def one(self) -> Iterator[None]:
        self.count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if not self.count:
                self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


@dataclasses.dataclass(eq=False)
class Subscriber:
    """One live stream: its filter, the flows not sent yet, and how many it lost."""

    filter: FlowFilter
    queue: asyncio.Queue[wire.Flow | None] = dataclasses.field(
        default_factory=lambda: asyncio.Queue(STREAM_QUEUE)
    )
    dropped: int = 0

    def take_dropped(self) -> int:
        n, self.dropped = self.dropped, 0
        return n


class Flows:
    def __init__(
        self,
        core: Core,
        store: FlowStore,
        cfg: FlowsConfig,
        pairings: InFlight | None = None,
    ) -> None:
        self._core = core
        self._pairings = pairings or InFlight()  # the pairings being answered now
        self.store = store
        self._cfg = cfg
        self._subs: set[Subscriber] = set()
        self.ingested = 0  # records kept since start
        self.lost = 0  # records the agents said they lost
        self.refused = 0  # records naming a workload not theirs
        self.batches = 0
        self.closing = False
        self.deferred = 0  # batches answered busy (the agent sends them again)
        self.repeated = 0  # batches sent again that were kept before
        self._waiting = 0
        rate = cfg.max_records_per_s
        bucket = max(rate * BURST_S, wire.MAX_FLOW_BATCH)
        self._pacer = Pacer(rate, bucket, MAX_WAIT_S) if rate else None

    # ---- ingest -------------------------------------------------------------------

    async def ingest(self, host_id: str, batch: wire.FlowBatchIn) -> None:
        await self._pace(len(batch.records))
        await self._after_pairings()
        try:
            records = flowresolve.check(batch, self._core.clock())
        except InvalidInput:
            if self._pacer is not None:  # a bad batch takes none of the pace
                self._pacer.give_back(len(batch.records))
            raise
        c = self._core.compiler
        local = {w.container_id: w for w in c.host_workloads(host_id)}

        def owner(ip: str) -> wire.Workload | None:
            owners = c.owners_of(ip, host_id)
            return owners[0] if owners else None

        flows: list[wire.Flow] = []
        peers: dict[str, wire.FlowEnd] = {}
        mine: dict[tuple[str, bool], wire.FlowEnd] = {}
        refused = 0
        for i, r in enumerate(records):
            if i and not i % YIELD_EVERY:  # let other requests in between
                await self._after_pairings()
            f = flowresolve.resolve(host_id, r, local, owner, peers, mine)
            if f is None:
                refused += 1
            else:
                flows.append(f)
        self._core.check_host(host_id)  # revoked while its batch waited: refused
        stored = await self.store.add(
            host_id, flows, batch.lost, refused, batch_id=batch.batch_id, at=self._core.clock()
        )
        if stored is None:
            self.repeated += 1
            _log.debug("flows.batch_repeated", host=host_id, batch=batch.batch_id)
            return
        self.ingested += len(stored)
        self.lost += batch.lost
        self.refused += refused
        self.batches += 1
        if refused or batch.lost:
            _log.info(
                "flows.batch", host=host_id, kept=len(stored), refused=refused, lost=batch.lost
            )
        self._publish(stored)

    async def _after_pairings(self) -> None:
        """Let the pairings being answered go first (for up to `PAIRING_FIRST_S`)."""
        await asyncio.sleep(0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._pairings.idle(), PAIRING_FIRST_S)

    async def _pace(self, n: int) -> None:
        """Wait for the batch's turn (`[server.flows] max_records_per_s`), or refuse
        it (503 `busy`) when that is more than `MAX_WAIT_S` away or too many wait."""
        if self._pacer is None or not n:
            return
        wait = self._pacer.take(n, time.monotonic()) if self._waiting < MAX_WAITING else None
        if wait is None:
            self.deferred += 1
            raise SegdError(
                "the server takes no more flows now; try again later", code="busy", status=503
            )
        if wait > 0:
            self._waiting += 1
            try:
                await asyncio.sleep(wait)
            finally:
                self._waiting -= 1

    # ---- queries ------------------------------------------------------------------

    async def page(self, flt: FlowFilter, limit: int, cursor: str) -> wire.FlowPage:
        after = parse_cursor(cursor) if cursor else None
        flows = await self.store.page(flt, limit + 1, after)
        more = len(flows) > limit
        flows = flows[:limit]
        return wire.FlowPage(flows=flows, next=cursor_of(flows[-1]) if more else "")

    async def export(self, flt: FlowFilter) -> AsyncIterator[list[wire.Flow]]:
        """Every matching flow, newest first, a page at a time."""
        after: tuple[float, int] | None = None
        while True:
            flows = await self.store.page(flt, EXPORT_PAGE, after)
            if flows:
                yield flows
            if len(flows) < EXPORT_PAGE:
                return
            after = (flows[-1].last_seen, flows[-1].id)

    # ---- live streams -------------------------------------------------------------

    def subscribe(self, flt: FlowFilter) -> Subscriber:
        if len(self._subs) >= self._cfg.max_stream_clients:
            raise SegdError(
                f"at most {self._cfg.max_stream_clients} flow streams at once",
                code="busy",
                status=503,
            )
        sub = Subscriber(flt)
        self._subs.add(sub)
        return sub

    def close(self) -> None:
        """End every live stream (the server is stopping)."""
        self.closing = True
        for sub in self._subs:
            if sub.queue.full():  # make room for the end: one flow it will not get
                sub.queue.get_nowait()
                sub.dropped += 1
            sub.queue.put_nowait(None)

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subs.discard(sub)

    @property
    def streams(self) -> int:
        return len(self._subs)

    def _publish(self, flows: list[wire.Flow]) -> None:
        for sub in self._subs:
            for f in flows:
                if sub.filter.matches(f):
                    try:
                        sub.queue.put_nowait(f)
                    except asyncio.QueueFull:
                        sub.dropped += 1

    # ---- retention ----------------------------------------------------------------

    async def housekeep(self) -> tuple[int, int]:
        """Sum old flows per hour, delete those past retention: (summed, deleted)."""
        now = self._core.clock()
        summed = deleted = 0
        if self._cfg.rollup_after_hours:
            summed = await self.store.rollup(now - self._cfg.rollup_after_hours * HOUR_S)
        if self._cfg.retention_days:
            deleted = await self.store.prune(now - self._cfg.retention_days * DAY_S)
        await self.store.forget_batches(now - BATCH_NAMES_KEPT_S)
        if summed or deleted:
            _log.info("flows.housekept", summed=summed, deleted=deleted)
        return summed, deleted
