"""Time to enforce, on the real Docker engine with `segd server` and `segd agent`.

Policy: web -> api on tcp/8080, api -> db on tcp/5432; containers cycle
through the three roles, each with a pairing key for its role. "Rules in
place" is the agent's first `enforce.done` log line of kind `workload` for the
container (logged after the table is applied and the IP admitted by the host
gate), at the line's timestamp; the start time is Docker's `start` event
(`timeNano`) and the moment `docker run -d` returned. Afterwards each
container's namespace is read from outside (`nsenter ... nft list table inet
segd`) to check the workload's set lookups are really there.

- one by one: start a container, wait for its rules, start the next;
- burst: all containers started at once (one `docker run -d` thread each);
- work: per phase, the agent's pairings, the instruction versions it accepted
  and its per-container converges (`enforce.done` lines); converges per version
  beside the workloads each version held (what re-converging every workload of
  the host costs);
- leak: containers that connect to a db they may not reach, one attempt every
  ~2 ms from their first instant (half of them paired as `web`, half with no
  key), started at once with an `api` container that may reach it (a check
  that the probe works); every connection that got through is counted.

Baseline: the same `docker run -d`, one by one and in a burst, with no agent
running (taken first, in the same run).
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.containers import (
    Containers,
    Events,
    Started,
    foreign_keyed,
    require_docker,
    table_in_netns,
)
from bench.report import Section, Size, Target, figure, ms, pct, summary
from bench.stack import (
    Agent,
    BenchError,
    Counts,
    Server,
    drop_gate,
    keep_logs,
    other_agents,
    proc_cpu_s,
    wait_for,
)

NAME = "enforce"
ROLES = ("web", "api", "db")
KEY = "segd.pairing-key"
DB_SERVE = "httpd -p 5432 -h /www && exec sleep 100000"


@dataclass(frozen=True)
class Params:
    one_by_one: int
    burst: int
    intruders: int
    attempts: int  # per intruder

    @classmethod
    def of(cls, size: Size) -> Params:
        if size == "tiny":
            return cls(one_by_one=3, burst=3, intruders=2, attempts=40)
        return cls(one_by_one=50, burst=50, intruders=6, attempts=300)


@dataclass
class Timing:
    """One phase, per container, in seconds: start event / run return -> rules, and stages."""

    missing: int  # containers whose rules never showed up
    from_start: list[float] = field(default_factory=list)
    from_return: list[float] = field(default_factory=list)
    run_s: list[float] = field(default_factory=list)  # `docker run -d` itself
    to_isolation: list[float] = field(default_factory=list)  # start -> isolation table
    # start -> the agent logs `workload.paired` (after the server's answer; the same
    # instructions may reach it first by long-poll, so the next stage can be negative)
    to_paired: list[float] = field(default_factory=list)
    paired_to_enforced: list[float] = field(default_factory=list)
    span: float = float("nan")  # first start event -> last container enforced
    verified: int = 0  # containers whose namespace holds the workload's set lookups


def _labels(role: str, keys: Mapping[str, str]) -> dict[str, str]:
    return {KEY: keys[role]}


def _timing(
    started: Sequence[Started], agent: Agent, events: Events, missing: Sequence[str]
) -> Timing:
    starts = events.wait([s.id for s in started])
    t = Timing(missing=len(missing))
    done: list[float] = []
    for s in started:
        t.run_s.append(s.returned - s.called)
        enforced = agent.enforced.get(s.id[:12])
        if enforced is None:
            continue
        done.append(enforced)
        t.from_return.append(enforced - s.returned)
        if s.id in starts:
            t.from_start.append(enforced - starts[s.id])
            iso = agent.isolated.get(s.id[:12])
            if iso is not None:
                t.to_isolation.append(iso - starts[s.id])
            paired = agent.paired.get(s.id[:12])
            if paired is not None:
                t.to_paired.append(paired - starts[s.id])
                t.paired_to_enforced.append(enforced - paired)
    if done and starts:
        t.span = max(done) - min(starts.values())
    pids = Containers.inspect([s.id for s in started])
    t.verified = sum(1 for pid, _ in pids.values() if "@ls_" in table_in_netns(pid))
    return t


def _reset(box: Containers, server: Server, agent: Agent) -> None:
    """Remove this phase's containers and wait until the server has unpaired them."""
    box.rm_all()

    def unpaired() -> bool:
        agent.poll()
        return server.workload_count() == 0

    wait_for(unpaired, 60, "workloads to be unpaired", interval=0.2)


def _settled(agent: Agent, quiet: float = 1.0, limit: float = 15.0) -> Counts:
    """The agent's counts once its log has shown no new work for `quiet` seconds
    (instructions still on their way after the last container is enforced)."""
    deadline = time.monotonic() + limit
    last, since = copy.copy(agent.counts), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        agent.poll()
        if agent.counts != last:
            last, since = copy.copy(agent.counts), time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def _work_figure(phase: str, label: str, work: Counts) -> Any:
    """Converges per accepted instruction version, beside the converges of an agent
    that brings every workload of the host to each version."""
    versions = max(1, work.versions)
    return figure(
        f"enforce.{phase}.converges_per_version",
        f"{label}: containers converged per instruction version",
        work.converges / versions,
        "",
        baseline=work.workloads / versions,
        baseline_label="workloads per version (all re-converged)",
        ratio="of",
    )


def _leak(box: Containers, agent: Agent, keys: Mapping[str, str], p: Params) -> dict[str, Any]:
    db = box.run(labels=_labels("db", keys), cmd=DB_SERVE)
    if agent.wait_enforced([db.id], 30):
        raise BenchError("the db container of the leak test was not enforced")
    db_ip = Containers.inspect([db.id])[db.id][1]
    nc = f"nc -w 1 {db_ip} 5432 </dev/null >/dev/null 2>&1"
    intrude = (
        f"i=0; while [ $i -lt {p.attempts} ]; do ({nc} && echo PEER) & usleep 2000; "
        "i=$((i+1)); done; wait; echo DONE; exec sleep 100000"
    )
    allowed = f"until {nc}; do usleep 2000; done; echo OPEN; exec sleep 100000"
    specs: list[tuple[Mapping[str, str], str]] = [(_labels("api", keys), allowed)]
    for i in range(p.intruders):
        specs.append((_labels("web", keys) if i % 2 == 0 else {}, intrude))
    started = box.run_many(specs, parallel=len(specs))
    intruders = [s.id for s in started[1:]]

    def finished() -> bool:
        return all("DONE" in Containers.logs(c) for c in intruders)

    wait_for(finished, 60 + p.attempts * 0.05, "intruders to finish", interval=0.5)
    leaked = sum(Containers.logs(c).count("PEER") for c in intruders)
    with contextlib.suppress(BenchError):
        wait_for(lambda: "OPEN" in Containers.logs(started[0].id), 10, "allowed connection")
    return {
        "leaked": leaked,
        "attempts": p.attempts * p.intruders,
        "intruders": p.intruders,
        "allowed_peer_connected": "OPEN" in Containers.logs(started[0].id),
    }


def _phase_figs(
    phase: str, label: str, t: Timing, base: list[float], targets: dict[str, Target]
) -> list[Any]:
    out = []
    for src, xs, what in (
        ("from_start", t.from_start, "from start event"),
        ("from_return", t.from_return, "from docker run returned"),
    ):
        vals = [ms(x) for x in xs]
        for q, name in ((0.5, "p50"), (0.99, "p99"), (1.0, "max")):
            tgt = targets.get(f"{src}.{name}")
            out.append(
                figure(
                    f"enforce.{phase}.{src}.{name}",
                    f"{label}: {what} ({name})",
                    pct(vals, q),
                    "ms",
                    baseline=pct([ms(b) for b in base], q),
                    baseline_label="bare docker run -d",
                    ratio="of",
                    targets=[tgt] if tgt else [],
                )
            )
    return out


def run(size: Size) -> Section:
    require_docker()
    p = Params.of(size)
    details: dict[str, Any] = {"params": p.__dict__}
    cpu: dict[str, float] = {}  # agent CPU seconds per phase
    work: dict[str, Counts] = {}  # the agent's pairings, versions and converges per phase
    with tempfile.TemporaryDirectory(prefix="segd-bench-") as tmp:
        root = Path(tmp)
        box = Containers()
        events = Events(box.run_id)
        server = Server(root)
        agent: Agent | None = None
        foreign = foreign_keyed(box.run_id)
        try:
            server.start()
            server.rule({"role": "api"}, {"role": "web"}, "tcp/8080")
            server.rule({"role": "db"}, {"role": "api"}, "tcp/5432")
            keys = {r: server.key(f"bench-{r}", {"role": r, "app": "bench"}) for r in ROLES}

            # Baselines: bare `docker run -d`, no agent running.
            bare_seq = box.run_many([({}, "")] * p.one_by_one, parallel=1)
            bare_burst = box.run_many([({}, "")] * p.burst, parallel=p.burst)
            bare_starts = events.wait([s.id for s in bare_burst])
            box.rm_all()

            agent = Agent(root, server)
            agent.start()

            seq: list[Started] = []
            missing: list[str] = []
            agent.poll()
            before = copy.copy(agent.counts)
            cpu0 = proc_cpu_s(agent.pid)
            for i in range(p.one_by_one):
                s = box.run(labels=_labels(ROLES[i % 3], keys))
                seq.append(s)
                # Once one is missed the agent is likely stuck: do not wait 30 s for each.
                missing += agent.wait_enforced([s.id], 5 if missing else 30)
            cpu["one_by_one"] = proc_cpu_s(agent.pid) - cpu0
            one = _timing(seq, agent, events, missing)
            work["one_by_one"] = _settled(agent).since(before)
            _reset(box, server, agent)

            specs = [(_labels(ROLES[i % 3], keys), "") for i in range(p.burst)]
            agent.poll()
            before = copy.copy(agent.counts)
            t0 = time.time()
            cpu0 = proc_cpu_s(agent.pid)
            burst_started = box.run_many(specs, parallel=p.burst)
            missing = agent.wait_enforced([s.id for s in burst_started], 120)
            cpu["burst"] = proc_cpu_s(agent.pid) - cpu0
            burst = _timing(burst_started, agent, events, missing)
            work["burst"] = _settled(agent).since(before)
            details["burst_first_call_to_last_enforced_ms"] = ms(
                max(agent.enforced.get(s.id[:12], t0) for s in burst_started) - t0
            )
            _reset(box, server, agent)

            leak = _leak(box, agent, keys, p)
            agent.poll()
            details["agent_errors"] = agent.error_summary()
            details["foreign_keyed_containers"] = sorted(
                set(foreign) | set(box.foreign(agent.denied))
            )
        finally:
            if agent is not None:
                agent.stop()
            box.rm_all()
            events.close()
            server.stop()
            details["logs"] = keep_logs(NAME, server.proc, *([agent.proc] if agent else []))
            if not other_agents():
                drop_gate()

    bare_seq_s = [s.returned - s.called for s in bare_seq]
    bare_burst_s = [s.returned - s.called for s in bare_burst]
    bare_span = max(bare_starts.values()) - min(bare_starts.values()) if bare_starts else 0.0
    figs = _phase_figs(
        "one_by_one",
        f"one by one ({p.one_by_one})",
        one,
        bare_seq_s,
        {"from_start.p99": Target("<=", 50.0)},
    )
    figs += _phase_figs(
        "burst",
        f"burst of {p.burst}",
        burst,
        bare_burst_s,
        {"from_start.max": Target("<=", 2000.0)},
    )
    figs.append(
        figure(
            "enforce.burst.span",
            f"burst of {p.burst}: first start event -> last enforced",
            ms(burst.span),
            "ms",
            baseline=ms(bare_span),
            baseline_label="bare burst, first -> last start event",
            ratio="of",
        )
    )
    figs += [
        _work_figure("one_by_one", f"one by one ({p.one_by_one})", work["one_by_one"]),
        _work_figure("burst", f"burst of {p.burst}", work["burst"]),
    ]
    figs.append(
        figure(
            "enforce.leaked",
            f"leaked connections ({leak['intruders']} intruders, tight loop)",
            leak["leaked"],
            "conns",
            baseline=leak["attempts"],
            baseline_label="attempts",
            targets=[Target("==", 0)],
        )
    )
    for name, t in (("one_by_one", one), ("burst", burst)):
        details[name] = {
            "from_start_ms": summary([ms(x) for x in t.from_start]),
            "from_return_ms": summary([ms(x) for x in t.from_return]),
            "docker_run_ms": summary([ms(x) for x in t.run_s]),
            "start_to_isolation_table_ms": summary([ms(x) for x in t.to_isolation]),
            "start_to_paired_log_ms": summary([ms(x) for x in t.to_paired]),
            "paired_log_to_enforced_ms": summary([ms(x) for x in t.paired_to_enforced]),
            "agent_cpu_ms_per_container": ms(cpu[name] / max(1, len(t.run_s))),
            "missing": t.missing,
            "verified_in_netns": t.verified,
            "from_start_all_ms": [ms(x) for x in t.from_start],
            "pairings": work[name].paired,
            "versions_accepted": work[name].versions,
            "converges": work[name].converges,
        }
    details["bare"] = {
        "one_by_one_run_ms": summary([ms(x) for x in bare_seq_s]),
        "burst_run_ms": summary([ms(x) for x in bare_burst_s]),
        "burst_start_span_ms": ms(bare_span),
    }
    details["leak"] = leak
    return Section(name=NAME, title="1. Time to enforce (Docker)", figures=figs, details=details)
