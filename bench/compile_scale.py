"""Compile scale: the server's policy compiler on a large estate (pure, no I/O).

Full compile: build the compiler's index from the rules and workloads
(`Compiler(rules, workloads)`), then compile every host (`compile_all`).
Incremental: what the server does for one pairing outside SQL — add the
workload to the compiler, then `Publisher.publish` the hosts the compiler
reports as affected (keep those whose content changed, by digest) and compile
those, as their agents' next reads do — and the same for the unpairing that
follows. The baseline of an incremental update is the
full compile; the baseline of "hosts recomputed" is the hosts whose
instructions really changed. A check compiles every host after a few of the
pairings to make sure no host that changed was left out.

Runs in a fresh interpreter so that the memory figures are this benchmark's
own: tracemalloc peak (in a second, traced pass) and the RSS growth.
"""

from __future__ import annotations

import gc
import multiprocessing
import time
import tracemalloc
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import nacl.signing

from bench import estate
from bench.report import Section, Size, Target, figure, ms, pct
from segd.server.compiler import Compiler, content_digest
from segd.server.publish import Publisher

# The estate's addresses are mesh addresses: every host may see every other's.
MESH_POOL = str(estate.FAKE_NET)


@dataclass(frozen=True)
class Params:
    workloads: int
    hosts: int
    rules: int
    apps: int
    samples: int  # pairings (each then unpaired) timed one by one
    checked: int  # of which this many are checked against a full recompile
    budget_s: float  # stop taking samples after this long (at least one is taken)

    @classmethod
    def of(cls, size: Size) -> Params:
        if size == "tiny":
            return cls(workloads=300, hosts=10, rules=40, apps=8, samples=3, checked=1, budget_s=30)
        return cls(
            workloads=10_000, hosts=100, rules=1_000, apps=60, samples=20, checked=3, budget_s=90
        )


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _publish(pub: Publisher, c: Compiler, hosts: Iterable[str], generation: int) -> set[str]:
    """Publish `hosts` at `generation`, compiling those that changed (as their
    agents' next reads do); return them."""
    changed = pub.publish(hosts, generation)
    for h, (version, _) in changed.items():
        c.compile_host(h, version)
    return set(changed)


def _digests(c: Compiler) -> dict[str, str]:
    return {h: content_digest(i) for h, i in c.compile_all().items()}


def measure(p: Params) -> dict[str, Any]:
    """The whole measurement (run in a child process); plain data out."""
    e = estate.build(p.workloads, p.hosts, p.rules, n_apps=p.apps)
    gc.collect()
    rss0 = _rss_kib()
    t0 = time.perf_counter()
    c = Compiler(e.rules, e.workloads, pool=MESH_POOL)
    t1 = time.perf_counter()
    compiled = c.compile_all()
    t2 = time.perf_counter()
    rss1 = _rss_kib()
    sizes = [sum(len(v) for v in i.sets.values()) for i in compiled.values()]
    per_host_rules = [len(i.rules) for i in compiled.values()]
    del compiled

    pub = Publisher(nacl.signing.SigningKey.generate(), c)
    t3 = time.perf_counter()
    generation = 1
    _publish(pub, c, pub.load({h: (0, "") for h in c.hosts()}), generation)
    t4 = time.perf_counter()

    pair_s: list[float] = []
    unpair_s: list[float] = []
    recomputed: list[int] = []
    changed: list[int] = []
    unpair_recomputed: list[int] = []
    missed = 0
    before = _digests(c) if p.checked else {}
    budget_end = time.monotonic() + p.budget_s
    for i in range(p.samples):
        if i > 0 and time.monotonic() > budget_end:
            break
        w = e.new_workload()
        s = time.perf_counter()
        affected = c.add_workload(w)
        generation += 1
        plan = _publish(pub, c, affected, generation)
        pair_s.append(time.perf_counter() - s)
        recomputed.append(len(affected))
        changed.append(len(plan))
        if i < p.checked:
            after = _digests(c)
            really = {h for h in after if after[h] != before.get(h)}
            missed += len(really - affected)
        s = time.perf_counter()
        affected = c.remove_workload(w.id)
        generation += 1
        _publish(pub, c, affected, generation)
        unpair_s.append(time.perf_counter() - s)
        unpair_recomputed.append(len(affected))
        if i < p.checked:
            before = _digests(c)

    # Memory, traced: the inputs, then the compiler and its full output on top.
    del c, pub
    gc.collect()
    tracemalloc.start()
    e2 = estate.build(p.workloads, p.hosts, p.rules, n_apps=p.apps)
    inputs = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    c2 = Compiler(e2.rules, e2.workloads, pool=MESH_POOL)
    out2 = c2.compile_all()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del out2, c2

    return {
        "index_s": t1 - t0,
        "compile_all_s": t2 - t1,
        "publish_all_s": t4 - t3,
        "rss_delta_kib": rss1 - rss0,
        "traced_inputs_b": inputs,
        "traced_peak_b": peak - inputs,
        "traced_retained_b": current - inputs,
        "pair_s": pair_s,
        "unpair_s": unpair_s,
        "recomputed": recomputed,
        "changed": changed,
        "unpair_recomputed": unpair_recomputed,
        "missed_hosts": missed,
        "checked": min(p.checked, len(pair_s)),
        "set_elements_per_host": {"min": min(sizes), "max": max(sizes), "mean": _mean(sizes)},
        "rules_per_host": {"min": min(per_host_rules), "max": max(per_host_rules)},
        "estate": e.label_stats(),
    }


def _mean(xs: list[int]) -> float:
    return round(sum(xs) / len(xs), 1) if xs else 0.0


def run(size: Size) -> Section:
    p = Params.of(size)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as ex:
        r = ex.submit(measure, p).result()
    full = r["index_s"] + r["compile_all_s"]
    scale = f"{p.workloads:,} workloads, {p.hosts} hosts, {p.rules:,} rules"
    mib = 2**20
    figs = [
        figure(
            "compile.full.s",
            f"full compile ({scale})",
            full,
            "s",
            targets=[Target("<=", 1.0)],
        ),
        figure("compile.full.index_s", "  of which: index build", r["index_s"], "s"),
        figure(
            "compile.full.compile_all_s", "  of which: compile every host", r["compile_all_s"], "s"
        ),
    ]
    for kind, key in (("pairing", "pair_s"), ("unpairing", "unpair_s")):
        xs = [ms(x) for x in r[key]]
        for q, name in ((0.5, "p50"), (1.0, "max")):
            figs.append(
                figure(
                    f"compile.incremental.{kind}.{name}",
                    f"one {kind}: update + replan ({name})",
                    pct(xs, q),
                    "ms",
                    baseline=ms(full),
                    baseline_label="full compile",
                    ratio="of",
                    targets=[Target("<=", 10.0)] if name == "max" else [],
                )
            )
    figs += [
        figure(
            "compile.incremental.hosts_recomputed.max",
            "hosts recomputed per pairing (max)",
            max(r["recomputed"]),
            "hosts",
            baseline=max(r["changed"]),
            baseline_label="hosts whose instructions changed",
        ),
        figure(
            "compile.incremental.hosts_missed",
            f"changed hosts not recomputed ({r['checked']} checked)",
            r["missed_hosts"],
            "hosts",
            targets=[Target("==", 0)],
        ),
        figure(
            "compile.memory.traced_peak",
            "memory: tracemalloc peak above inputs",
            r["traced_peak_b"] / mib,
            "MiB",
            baseline=r["traced_inputs_b"] / mib,
            baseline_label="inputs",
            ratio="of",
        ),
        figure(
            "compile.memory.rss_delta",
            "memory: RSS growth",
            r["rss_delta_kib"] / 1024,
            "MiB",
            baseline=r["traced_inputs_b"] / mib,
            baseline_label="inputs",
            ratio="of",
        ),
    ]
    details = {
        "params": p.__dict__,
        "publish_all_s": r["publish_all_s"],
        "pair_ms": [ms(x) for x in r["pair_s"]],
        "unpair_ms": [ms(x) for x in r["unpair_s"]],
        "hosts_recomputed": r["recomputed"],
        "hosts_changed": r["changed"],
        "unpair_hosts_recomputed": r["unpair_recomputed"],
        "traced_retained_mib": round(r["traced_retained_b"] / mib, 1),
        "set_elements_per_host": r["set_elements_per_host"],
        "rules_per_host": r["rules_per_host"],
        "estate": r["estate"],
        "label_distribution": (estate.__doc__ or "").strip(),
    }
    return Section(name="compile", title="3. Compile scale (pure)", figures=figs, details=details)
