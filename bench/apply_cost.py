"""Apply cost per namespace: segd's `Firewall` (libnftables backend) against `nsenter nft -f`.

A throwaway network namespace (`ip netns add`, deleted afterwards) gets a
workload's table as the agent renders it (`render.render_workload`): 20 peer
sets (10 inbound and 10 outbound allows, one tcp service each) holding 200
addresses in all — and a large variant with 2,000. Through `Firewall.apply`
(the root module: the worker thread, the namespace's cached libnftables
context) we time a full apply as the agent makes it when a table it knows
changes (rewritten in place, one transaction), a full apply of a table it
does not know (replaced behind a shadow table, three transactions), and one
set element change (`render.render_set_delta`, alternately adding and deleting
one address). Baseline: the whole table as one same-name replace script
(`render.workload_script`; the deltas' own text) through
`nsenter --net=... nft -f -` in the same namespace, in the same run.
Reported: medians (p50) and p99.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench.estate import fake_ip
from bench.report import Figure, Section, Size, Target, figure, ms, pct
from bench.stack import BenchError, require_kernel
from segd.firewall import render
from segd.firewall.kernel import Firewall, NsRef
from segd.firewall.plan import Plan
from segd.policy import Service, set_name
from segd.wire import Allow, WorkloadPolicy


@dataclass(frozen=True)
class Params:
    sets: int
    per_set: int
    large_per_set: int
    reps: int  # Firewall operations of each kind
    nft_reps: int  # nsenter nft -f runs of each kind
    extra_ns: int  # namespaces bound at once, for the memory each one holds

    @classmethod
    def of(cls, size: Size) -> Params:
        if size == "tiny":
            return cls(sets=20, per_set=10, large_per_set=100, reps=5, nft_reps=3, extra_ns=3)
        return cls(sets=20, per_set=10, large_per_set=100, reps=200, nft_reps=40, extra_ns=20)


def workload(n_sets: int, per_set: int) -> tuple[WorkloadPolicy, dict[str, list[str]]]:
    names = [set_name({"app": f"peer{i:02d}"}) for i in range(n_sets)]
    allows = [
        Allow(rule_id=f"r_{i:08x}", peer=n, services=[Service("tcp", 8000 + i, 8000 + i)])
        for i, n in enumerate(names)
    ]
    half = n_sets // 2
    pol = WorkloadPolicy(
        workload_id="w_bench",
        container_id="bench",
        labels={"role": "bench"},
        ips=[fake_ip(0)],
        inbound=allows[:half],
        outbound=allows[half:],
    )
    sets = {n: [fake_ip(1 + i * per_set + j) for j in range(per_set)] for i, n in enumerate(names)}
    return pol, sets


async def _time(n: int, op: Callable[[int], Awaitable[None]]) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        await op(i)
        out.append(time.perf_counter() - t)
    return out


def _nft(path: str, script: str) -> float:
    t = time.perf_counter()
    p = subprocess.run(
        ["nsenter", f"--net={path}", "nft", "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        check=False,
    )
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise BenchError(f"nft -f failed: {p.stderr.strip()}")
    return dt


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def _measure(p: Params, path: str, extra: list[str]) -> dict[str, list[float]]:
    pol, sets = workload(p.sets, p.per_set)
    big_pol, big_sets = workload(p.sets, p.large_per_set)
    referenced = render.referenced_sets(pol)
    unknown = render.render_workload(
        pol, sets
    )  # what the agent applies to a table it does not know
    full = render.render_workload(pol, sets, was=referenced)  # ... and to one it knows
    big = render.render_workload(big_pol, big_sets, was=referenced)
    script = render.workload_script(pol, sets)
    big_script = render.workload_script(big_pol, big_sets)
    first = sorted(referenced)[0]
    grown = {**sets, first: [*sets[first], fake_ip(100_000)]}
    add = render.render_set_delta(sets, grown, referenced)
    delete = render.render_set_delta(grown, sets, referenced)
    assert add is not None and delete is not None
    ns = NsRef(key="bench", path=path)
    r: dict[str, list[float]] = {}
    async with Firewall("libnftables") as fw:
        t = time.perf_counter()
        await fw.apply(ns, unknown)  # binds the namespace's libnftables context
        r["first"] = [time.perf_counter() - t]

        def applying(*plans: Plan) -> Callable[[int], Awaitable[None]]:
            async def op(i: int) -> None:
                await fw.apply(ns, plans[i % len(plans)])

            return op

        async def listing(_: int) -> None:
            await fw.list_table(ns)

        r["full"] = await _time(p.reps, applying(full))
        r["replace"] = await _time(p.reps, applying(unknown))
        r["single_full"] = await _time(p.reps, applying(Plan("one", (script,))))
        r["element"] = await _time(p.reps, applying(add, delete))
        r["list"] = await _time(p.reps, listing)
        await fw.apply(ns, big)
        r["big"] = await _time(max(3, p.reps // 4), applying(big))
        await fw.apply(ns, full)
        if "@ls_" not in (await fw.list_table(ns) or ""):
            raise BenchError("the applied table is not in the namespace")
        # What each namespace the applier keeps a context for costs in memory.
        rss0 = _rss_kib()
        for i, e in enumerate(extra):
            await fw.apply(NsRef(key=f"extra{i}", path=e), unknown)
            await fw.list_table(NsRef(key=f"extra{i}", path=e))
        r["rss_per_ns_kib"] = [(_rss_kib() - rss0) / max(1, len(extra))]
        for i, e in enumerate(extra):
            await fw.forget(NsRef(key=f"extra{i}", path=e))
    r["nft_full"] = [_nft(path, script) for _ in range(p.nft_reps)]
    r["nft_element"] = [
        _nft(path, add.text if i % 2 == 0 else delete.text) for i in range(p.nft_reps)
    ]
    r["nft_big"] = [_nft(path, big_script) for _ in range(max(3, p.nft_reps // 4))]
    return r


def run(size: Size) -> Section:
    require_kernel()
    p = Params.of(size)
    tag = f"segd-bench-{secrets.token_hex(3)}"
    names = [tag] + [f"{tag}-{i}" for i in range(p.extra_ns)]
    made: list[str] = []
    try:
        for n in names:
            subprocess.run(["ip", "netns", "add", n], check=True, capture_output=True)
            made.append(n)
        paths = [f"/run/netns/{n}" for n in names]
        r = asyncio.run(_measure(p, paths[0], paths[1:]))
    finally:
        for n in made:
            subprocess.run(["ip", "netns", "delete", n], check=False, capture_output=True)
    n_el, n_big = p.sets * p.per_set, p.sets * p.large_per_set
    figs: list[Figure] = []
    rows: tuple[tuple[str, str, str, str, list[Target]], ...] = (
        ("full", "nft_full", f"full apply ({n_el} addresses)", "nft -f", [Target("<=", 3.0)]),
        ("replace", "nft_full", f"full apply, table unknown ({n_el})", "nft -f", []),
        ("element", "nft_element", "one set element add/delete", "nft -f", [Target("<=", 1.0)]),
        ("big", "nft_big", f"full apply ({n_big:,} addresses)", "nft -f", []),
    )
    for key, base_key, label, base_label, targets in rows:
        for q, qn in ((0.5, "p50"), (0.99, "p99")):
            tg = [*targets, Target(">=", 5.0, on="ratio")] if targets and qn == "p50" else []
            figs.append(
                figure(
                    f"apply.{key}.{qn}",
                    f"{label} ({qn})",
                    ms(pct(r[key], q)),
                    "ms",
                    baseline=ms(pct(r[base_key], q)),
                    baseline_label=f"nsenter {base_label}",
                    ratio="faster",
                    targets=tg,
                )
            )
    details: dict[str, Any] = {
        "params": p.__dict__,
        "first_apply_ms": ms(r["first"][0]),
        "list_table_ms": {"p50": ms(pct(r["list"], 0.5)), "p99": ms(pct(r["list"], 0.99))},
        "full_as_one_libnftables_transaction_ms": {
            "p50": ms(pct(r["single_full"], 0.5)),
            "p99": ms(pct(r["single_full"], 0.99)),
        },
        "script_bytes": {"full": len(render.workload_script(*workload(p.sets, p.per_set)))},
        "backend": "libnftables",
        "rss_per_bound_namespace_kib": round(r["rss_per_ns_kib"][0], 1),
    }
    return Section(
        name="apply", title="4. Apply cost per namespace (kernel)", figures=figs, details=details
    )
