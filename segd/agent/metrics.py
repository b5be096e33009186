"""The agent's Prometheus metrics, and the opt-in loopback listener that serves them.

One registry per agent (never the process-wide default, so several agents in
one process, as in tests, keep their own). Counters and the apply-time
histogram are updated where things happen; gauges of state (containers by
state, gate entries, open log readers) are read from the agent's `Host` when
scraped. `[agent] metrics_listen` (loopback only; empty: off) serves
`GET /metrics` in the Prometheus text format.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from segd import log
from segd.agent.host import Host
from segd.agent.ops import IsolationTable, NoTable, WorkloadTable
from segd.config import parse_listen

_log = log.get(__name__)

STATES = ("workload", "visibility", "idle", "isolated", "exempt", "pending")
"""Containers by state: enforced workloads in mode full / visibility / idle,
isolated, exempt (unkeyed, `isolate_unkeyed = false`), pending (no table of
their kind yet, or failed)."""


def states(host: Host) -> dict[str, int]:
    """How many of the host's enforced containers are in each state (pure)."""
    out = Tally({s: 0 for s in STATES})
    for cid, rec in host.enforced.items():
        pol = host.workloads.get(cid)
        if rec.kind == "workload" and isinstance(rec.table, WorkloadTable):
            out["visibility" if rec.table.structure.mode == "visibility" else "workload"] += 1
        elif rec.kind == "exempt" and pol is not None and pol.mode == "idle":
            out["idle"] += 1
        elif rec.kind == "isolated" and isinstance(rec.table, IsolationTable):
            out["isolated"] += 1
        elif rec.kind == "exempt" and (rec.table is None or isinstance(rec.table, NoTable)):
            out["exempt"] += 1
        else:
            out["pending"] += 1
    return dict(out)


class _HostCollector(Collector):
    def __init__(self, host: Host, readers: Callable[[], int]) -> None:
        self.host = host
        self.readers = readers

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily(
            "segd_agent_containers", "Containers the agent enforces, by state", labels=["state"]
        )
        for state, n in states(self.host).items():
            g.add_metric([state], n)
        yield g
        entries = sum(len(rec.gated) for rec in self.host.enforced.values())
        yield GaugeMetricFamily(
            "segd_agent_gate_entries", "(bridge port, address) pairs the host gate admits", entries
        )
        yield GaugeMetricFamily(
            "segd_agent_log_readers", "Container namespaces with an NFLOG reader", self.readers()
        )
        yield GaugeMetricFamily(
            "segd_agent_instructions_version", "Version of the instructions held", self.host.version
        )


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.apply_seconds = Histogram(
            "segd_agent_ruleset_apply_seconds",
            "Time to apply one container's table (plan run and listed)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.apply_failures = Counter(
            "segd_agent_apply_failures", "Kernel operations that failed", ["op"], registry=r
        )
        self.drift_repairs = Counter(
            "segd_agent_drift_repairs",
            "Tables (or the gate) found changed outside segd and repaired",
            ["what"],
            registry=r,
        )
        self.docker_events = Counter(
            "segd_agent_docker_events", "Docker events handled", ["event"], registry=r
        )
        self.policy_drops = Counter(
            "segd_agent_policy_drops",
            "Packets containers' tables dropped, as logged (rate-limited per container)",
            ["direction"],
            registry=r,
        )
        self.flow_packets = Counter(
            "segd_agent_flow_packets",
            "Logged packets counted into flow records, by verdict",
            ["verdict"],
            registry=r,
        )
        self.flow_records_sent = Counter(
            "segd_agent_flow_records_sent", "Flow records the server took", registry=r
        )
        self.flow_records_lost = Counter(
            "segd_agent_flow_records_lost",
            "Flow records dropped (queue or interval full) and reader overruns",
            registry=r,
        )
        for d in ("in", "out"):
            self.policy_drops.labels(d)
        for op in ("apply", "ports", "gate"):
            self.apply_failures.labels(op)
        for what in ("table", "gate"):
            self.drift_repairs.labels(what)

    def watch(self, host: Host, readers: Callable[[], int]) -> None:
        """Report the host's state gauges at every scrape."""
        self.registry.register(_HostCollector(host, readers))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class MetricsListener:
    """`GET /metrics` on a loopback address (`[agent] metrics_listen`)."""

    def __init__(self, metrics: AgentMetrics, listen: str) -> None:
        self.metrics = metrics
        self.host, self.port = parse_listen(listen)
        self._runner: web.AppRunner | None = None

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.text(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        _log.info("metrics.listening", listen=f"{self.host}:{self.port}")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
