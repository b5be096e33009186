"""Flow records to the server: count logged packets, send a batch every interval.

The kernel module calls `on_log` on the event loop with what a container's
table logged, and `on_count` with the connections that ended in a namespace
whose connections are counted (`enhanced`); both are counted into the pure
`flows.Flows` (no I/O, bounded). `run` closes the interval every
`[agent] flow_interval_s` seconds (first counting, from a conntrack dump, what
the connections still open carried since the last one) and sends
the queued batches as signed `POST /v1/agent/flows`. An unreachable server is
tried again with backoff until the next interval closes (the batches stay
queued, bounded; the oldest are dropped and counted); a batch the server
refuses (4xx) is dropped and counted as lost. This task never waits on the
enforcement task, nor it on this one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

from segd import log
from segd.agent.client import Denied, ServerClient, ServerUnavailable
from segd.agent.flows import Directory, Flows
from segd.agent.metrics import AgentMetrics
from segd.agent.retry import Backoff
from segd.firewall import nflog
from segd.firewall.conntrack import CtEntry
from segd.firewall.nflog import LogPacket

Dump = Callable[[], Awaitable[Mapping[str, list[CtEntry]]]]

_log = log.get(__name__)


class FlowReporter:
    def __init__(
        self,
        client: ServerClient,
        directory: Callable[[], Directory],
        metrics: AgentMetrics,
        *,
        interval: float,
        backoff_max: float,
        flows: Flows | None = None,
        owner: Callable[[str], str | None] = lambda _ip: None,
        dump: Dump | None = None,
    ) -> None:
        self.client = client
        self.directory = directory
        self.metrics = metrics
        self.interval = interval
        self.backoff_max = backoff_max
        self.flows = flows or Flows()
        self.owner = owner  # the local container holding an address
        self.dump = dump  # the open connections of every counted namespace
        self._lost_seen = 0

    def _recount(self) -> None:
        """Follow the instructions' counted containers (`directory()` is cached)."""
        counted = self.directory().counted
        if counted is not self.flows.counted:
            self.flows.recount(counted)

    def on_log(self, container: str, packets: list[LogPacket], lost: int) -> None:
        """Packets a container's table (or, `nflog.GATE_LOG_KEY`, the host gate)
        logged; called on the loop by the kernel module."""
        self._recount()
        now = time.time()
        by_owner: dict[str, list[LogPacket]] = {}
        for p in packets:
            tag = nflog.parse(p.prefix)
            if tag is None:
                continue
            self.metrics.flow_packets.labels(tag.verdict).inc()
            if tag.verdict == "blocked":
                self.metrics.policy_drops.labels(tag.direction).inc()
            if container == nflog.GATE_LOG_KEY:
                # the gate's drop of a frame a container sent (`out`) or would receive
                cid = self.owner(p.src if tag.direction == "out" else p.dst)
                if cid is not None:
                    by_owner.setdefault(cid, []).append(p)
        if container != nflog.GATE_LOG_KEY:
            self.flows.count(container, packets, now)
        for cid, these in by_owner.items():
            self.flows.count(cid, these, now)
        if lost:
            self.flows.overrun(lost)
        self._count_lost()

    def on_count(self, container: str, entries: list[CtEntry], lost: int) -> None:
        """Connections that ended in a counted container's namespace, and how many
        the kernel dropped before they were read; called on the loop by the
        kernel module."""
        self._recount()
        self.flows.count_connections(container, entries, time.time())
        if lost:
            self.flows.overrun(lost)
        self._count_lost()

    async def _count_open(self) -> None:
        """What the connections still open carried since the last interval."""
        if self.dump is None:
            return
        self.flows.dump_started()  # `on_log` and `on_count` go on meanwhile
        try:
            found = await self.dump()
        except Exception as e:  # visibility never stops the agent
            self.flows.dump_ended()
            _log.warning("flows.dump_failed", error=str(e) or repr(e))
            return
        except BaseException:
            self.flows.dump_ended()
            raise
        self._recount()
        self.flows.count_open(found, time.time())

    def _count_lost(self) -> None:
        if self.flows.lost_total > self._lost_seen:
            self.metrics.flow_records_lost.inc(self.flows.lost_total - self._lost_seen)
            self._lost_seen = self.flows.lost_total

    async def run(self) -> None:
        """Close an interval and send, forever."""
        close = time.monotonic() + self.interval
        while True:
            await asyncio.sleep(max(0.0, close - time.monotonic()))
            close = max(close + self.interval, time.monotonic())
            await self.flush(until=close)  # retried until the next interval closes

    async def flush(self, until: float | None = None) -> None:
        """Close the interval and send every queued batch; an unreachable server
        is tried again with backoff until `until` (monotonic; None: once)."""
        await self._count_open()
        n = self.flows.close_interval(self.directory())
        self._count_lost()
        if n:
            _log.debug("flows.interval", records=n, queued=self.flows.queued)
        backoff = Backoff(self.backoff_max)
        while (batch := self.flows.next_batch()) is not None:
            try:
                await self.client.flows(batch)
            except ServerUnavailable as e:
                if until is None or time.monotonic() + backoff.delay >= until:
                    _log.warning("flows.unsent", queued=self.flows.queued, error=str(e))
                    return
                await backoff.wait()
                continue
            except Denied as e:
                _log.warning("flows.refused", records=len(batch.records), error=str(e))
                self.flows.refused(batch)
                self._count_lost()
                if not batch.records:
                    return
                continue
            self.flows.sent(batch)
            self.metrics.flow_records_sent.inc(len(batch.records))
