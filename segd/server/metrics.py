"""The server's Prometheus metrics (`GET /metrics`, text format).

Events are counted as they happen (pairings by result and reason, applied
commits' compile time, instruction versions published); states are read at
scrape time from the running service (workloads, hosts by state, long-polls
waiting, flow streams, flow records kept, lost and refused). Each server has a
registry of its own, so several servers in one process (tests, allinone) do not
mix their figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from segd.server.service import Service

# No `*_created` series: a scraper learns a restart from the counters going down.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_COMPILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, svc: Service) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.pairings = Counter(
            "segd_pairings",
            "Pairing requests answered, by result (ok, denied) and reason (a refusal's code)",
            ["result", "reason"],
            registry=r,
        )
        self.compile_seconds = Histogram(
            "segd_compile_seconds",
            "Time to apply one durable commit: compile the hosts it changes and publish them",
            buckets=_COMPILE_BUCKETS,
            registry=r,
        )
        self.pushes = Counter(
            "segd_instruction_pushes",
            "Host instruction versions published (each wakes that host's long-poll)",
            registry=r,
        )
        r.register(_Live(svc))

    def paired(self, result: str, reason: str) -> None:
        self.pairings.labels(result, reason).inc()

    def applied(self, seconds: float, hosts: int) -> None:
        self.compile_seconds.observe(seconds)
        if hosts:
            self.pushes.inc(hosts)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live(Collector):
    """What is read from the service at each scrape."""

    def __init__(self, svc: Service) -> None:
        self._svc = svc

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        svc = self._svc
        yield GaugeMetricFamily(
            "segd_workloads", "Paired workloads", value=len(svc.compiler.workloads())
        )
        hosts = GaugeMetricFamily("segd_hosts", "Registered hosts, by state", labels=["state"])
        revoked = sum(1 for h in svc.hosts.values() if h.revoked)
        hosts.add_metric(["active"], len(svc.hosts) - revoked)
        hosts.add_metric(["revoked"], revoked)
        yield hosts
        yield GaugeMetricFamily(
            "segd_longpoll_waiters", "Agent long-polls waiting now", value=svc.hub.waiting
        )
        yield GaugeMetricFamily(
            "segd_flow_streams", "Live flow streams open now", value=svc.flows.streams
        )
        f = svc.flows
        for name, doc, value in (
            ("segd_flow_records_ingested", "Flow records kept", f.ingested),
            ("segd_flow_records_lost", "Flow records the agents reported lost", f.lost),
            (
                "segd_flow_records_refused",
                "Flow records refused (a workload not the reporting host's)",
                f.refused,
            ),
            ("segd_flow_batches", "Flow batches taken in", f.batches),
            ("segd_flow_batches_deferred", "Flow batches answered busy (paced)", f.deferred),
            ("segd_flow_batches_repeated", "Flow batches sent again, kept before", f.repeated),
        ):
            yield CounterMetricFamily(name, doc, value=value)
