"""The agent's own figures: which kernel operations count as applied or failed."""

from __future__ import annotations

from segd.agent.host import Host
from segd.agent.metrics import AgentMetrics
from segd.agent.observe import footprint, observe_op
from segd.agent.ops import (
    ApplyTable,
    Done,
    Failed,
    GateSubnets,
    IsolationTable,
    LookupPorts,
    Ns,
    Op,
)
from segd.firewall.plan import Plan

NS = Ns("web", "/proc/1/ns/net")
PLAN = Plan(what="isolation", txs=("add table inet segd\n",))


def failures(m: AgentMetrics, op: str) -> float | None:
    return m.registry.get_sample_value("segd_agent_apply_failures_total", {"op": op})


def applied_s(m: AgentMetrics) -> float | None:
    return m.registry.get_sample_value("segd_agent_ruleset_apply_seconds_sum")


def test_a_run_plan_is_timed_and_a_failure_counted_by_its_kind() -> None:
    m = AgentMetrics()
    apply = ApplyTable("web", NS, "isolated", PLAN, IsolationTable())
    observe_op(m, apply, Done(apply), 0.002)
    assert applied_s(m) == 0.002
    ops: list[tuple[Op, str]] = [
        (apply, "apply"),
        (LookupPorts("web", NS), "ports"),
        (GateSubnets(("172.17.0.0/16",), PLAN), "gate"),
    ]
    for op, kind in ops:
        observe_op(m, op, Failed(op, "refused"), 0.001)
        assert failures(m, kind) == 1
    assert applied_s(m) == 0.002  # a failed apply is not timed


def test_an_operation_on_a_namespace_already_gone_is_no_failure() -> None:
    m = AgentMetrics()
    apply = ApplyTable("web", NS, "isolated", PLAN, IsolationTable())
    observe_op(m, apply, Failed(apply, "no such namespace", gone=True), 0.001)
    observe_op(m, ApplyTable("web", NS, "isolated", None, None), Done(apply), 0.001)
    assert failures(m, "apply") == 0
    assert applied_s(m) == 0  # nothing was run


async def test_footprint_counts_what_a_leak_check_watches() -> None:
    fp = footprint(Host(isolate_unkeyed=True), namespaces=3, pairing=2)
    assert fp["namespaces"] == 3 and fp["pairing"] == 2 and fp["containers"] == 0
    assert fp["tasks"] >= 1 and fp["fds"] > 0 and fp["rss_kb"] > 0
