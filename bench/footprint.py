"""Agent footprint: RSS and CPU of the `segd agent` process with many enforced containers.

A `segd server` and a `segd agent` (default settings, JSON debug logs) as
processes. Baseline: the same agent, idle, before any container exists.
Then `containers` keyed containers (web/api/db, the three-tier policy of the
enforce benchmark) are started and waited for until all are enforced; the
agent is measured idle (`idle_s`, which spans its periodic reconcile) and
during churn (`churn_s` of stopping and starting `churn_batch` containers at a
time, each of which the agent must re-enforce in its new namespace). RSS is
VmRSS sampled every 0.5 s (mean and peak); CPU is user + system time over the
window, as a percentage of one core.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.containers import Containers, docker, foreign_keyed, require_docker
from bench.report import Figure, Section, Size, Target, figure
from bench.stack import (
    Agent,
    BenchError,
    Server,
    drop_gate,
    keep_logs,
    other_agents,
    proc_cpu_s,
    proc_rss_kib,
)

NAME = "footprint"
ROLES = ("web", "api", "db")


@dataclass(frozen=True)
class Params:
    containers: int
    idle_s: float
    churn_s: float
    churn_batch: int
    baseline_s: float
    reconcile_s: float

    @classmethod
    def of(cls, size: Size) -> Params:
        if size == "tiny":
            return cls(
                containers=4, idle_s=2, churn_s=3, churn_batch=2, baseline_s=1, reconcile_s=30
            )
        return cls(
            containers=100, idle_s=30, churn_s=30, churn_batch=5, baseline_s=10, reconcile_s=30
        )


@dataclass
class Window:
    rss_mean_mib: float
    rss_peak_mib: float
    cpu_pct: float
    seconds: float


class Sampler:
    """RSS samples and CPU time of one process over a window."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss: list[int] = []
        self._t0 = time.monotonic()
        self._cpu0 = proc_cpu_s(pid)
        self._next = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self._next:
            self.rss.append(proc_rss_kib(self.pid))
            self._next = now + 0.5

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.tick()
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))

    def done(self) -> Window:
        self.tick()
        wall = time.monotonic() - self._t0
        cpu = proc_cpu_s(self.pid) - self._cpu0
        return Window(
            rss_mean_mib=sum(self.rss) / len(self.rss) / 1024,
            rss_peak_mib=max(self.rss) / 1024,
            cpu_pct=100 * cpu / wall if wall > 0 else 0.0,
            seconds=round(wall, 2),
        )


def _churn(box: Containers, agent: Agent, p: Params, ids: list[str]) -> tuple[Window, int]:
    s = Sampler(agent.pid)
    end = time.monotonic() + p.churn_s
    cycles = 0
    while time.monotonic() < end:
        batch = [ids[(cycles * p.churn_batch + j) % len(ids)] for j in range(p.churn_batch)]
        docker("stop", "-t", "0", *batch)
        s.tick()
        docker("start", *batch)
        s.tick()
        agent.poll()
        cycles += 1
    return s.done(), cycles


def run(size: Size) -> Section:
    require_docker()
    p = Params.of(size)
    details: dict[str, Any] = {"params": p.__dict__}
    with tempfile.TemporaryDirectory(prefix="segd-bench-") as tmp:
        root = Path(tmp)
        box = Containers()
        server = Server(root)
        agent: Agent | None = None
        foreign = foreign_keyed(box.run_id)
        try:
            server.start()
            server.rule({"role": "api"}, {"role": "web"}, "tcp/8080")
            server.rule({"role": "db"}, {"role": "api"}, "tcp/5432")
            keys = {r: server.key(f"bench-{r}", {"role": r, "app": "bench"}) for r in ROLES}
            agent = Agent(root, server, reconcile_s=p.reconcile_s)
            agent.start()
            b = Sampler(agent.pid)
            b.sleep(p.baseline_s)
            base = b.done()

            specs = [({"segd.pairing-key": keys[ROLES[i % 3]]}, "") for i in range(p.containers)]
            ids = [s.id for s in box.run_many(specs, parallel=8)]
            missing = agent.wait_enforced(ids, 120)
            if missing:
                raise BenchError(f"{len(missing)} of {p.containers} containers were not enforced")
            enforced_at = time.monotonic()
            idle_sampler = Sampler(agent.pid)
            idle_sampler.sleep(p.idle_s)
            idle = idle_sampler.done()
            churn, cycles = _churn(box, agent, p, ids)
            agent.poll()
            after = proc_rss_kib(agent.pid) / 1024
            details |= {
                "churn_cycles": cycles,
                "containers_restarted": cycles * p.churn_batch,
                "rss_after_churn_mib": round(after, 1),
                "rss_per_container_kib": round(
                    (idle.rss_mean_mib - base.rss_mean_mib) * 1024 / p.containers, 1
                ),
                "seconds_from_enforced_to_end": round(time.monotonic() - enforced_at, 1),
                "agent_errors": agent.error_summary(),
                "foreign_keyed_containers": sorted({*foreign, *box.foreign(agent.denied)}),
                "baseline": base.__dict__,
                "idle": idle.__dict__,
                "churn": churn.__dict__,
            }
        finally:
            if agent is not None:
                agent.stop()
            box.rm_all()
            server.stop()
            details["logs"] = keep_logs(NAME, server.proc, *([agent.proc] if agent else []))
            if not other_agents():
                drop_gate()
    n = p.containers
    figs: list[Figure] = [
        figure(
            "footprint.idle.rss",
            f"RSS, idle, {n} containers enforced (mean)",
            idle.rss_mean_mib,
            "MiB",
            baseline=base.rss_mean_mib,
            baseline_label="agent idle, no containers",
            ratio="of",
            targets=[Target("<=", 80.0)],
        ),
        figure(
            "footprint.churn.rss_peak",
            f"RSS peak during churn ({cycles} x {p.churn_batch} restarts)",
            churn.rss_peak_mib,
            "MiB",
            baseline=base.rss_peak_mib,
            baseline_label="agent idle, no containers",
            ratio="of",
            targets=[Target("<=", 80.0)],
        ),
        figure(
            "footprint.idle.cpu",
            f"CPU, idle, {n} containers ({p.idle_s:g} s)",
            idle.cpu_pct,
            "% core",
            baseline=base.cpu_pct,
            baseline_label="agent idle, no containers",
        ),
        figure(
            "footprint.churn.cpu",
            f"CPU during churn ({p.churn_s:g} s)",
            churn.cpu_pct,
            "% core",
            baseline=base.cpu_pct,
            baseline_label="agent idle, no containers",
        ),
    ]
    return Section(name=NAME, title="5. Agent footprint", figures=figs, details=details)
