"""What the kernel should do next, from what the agent knows (pure).

Per container the desired state is one of:

* `workload`  — paired: its instructions rendered as the namespace's table, and
  its addresses admitted by the host gate;
* `isolated`  — keyed but not (yet) paired, denied, or unkeyed while
  `isolate_unkeyed` is on: an isolation table, and never in the gate;
* `exempt`    — unkeyed with `isolate_unkeyed = false`, or paired in mode `idle`:
  no table, admitted by the gate.

Modes (`full`, `visibility`, `idle`) and visibility levels come with a paired
workload's policy, so they relax nothing for a container that is not paired:
keyed-but-unpaired, refused and (with `isolate_unkeyed`) unkeyed containers
are isolated whatever mode their profile would have.

`step(host, batch, failed)` compares that with what is enforced, for the
containers of `batch`, and returns the next kernel operations (`ops`); the
agent runs them, folds each result into the `Host`, and asks again until
nothing is left. Every rule about order and fallback lives here, once:

- the gate stops admitting an address before anything else happens to its
  container, and admits one only once its container's table is in place;
- containers waiting for their first table of a kind go first; the others
  (set changes of peers) in the next step;
- a set change is an element delta; refused, the table is not what the agent
  left (tampered, or a new namespace): it is unknown, and replaced whole next;
- a table the agent knows is rewritten in place (its plan falls back to a
  replace); one it does not know (after a restart of the agent, or changed
  behind its back) is replaced whole; a namespace the agent saw being made is
  known to hold none;
- a container whose work failed gets no more work in this batch and leaves
  the gate (fail closed);
- a paired container in a namespace the agent did not see being made has its
  table read first: none there is a restart the agent missed, and it is paired
  again (`Host.unverified`);
- the gate is built whole once every container has its table after the agent
  starts, and again whenever a change to it failed or it went missing.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass, field

import msgspec

from segd.agent.host import Enforced, Host
from segd.agent.ops import (
    RETIRED,
    ApplyTable,
    Forget,
    GateChange,
    GateRebuild,
    GateSubnets,
    IsolationTable,
    Kind,
    ListGate,
    ListTable,
    LookupPorts,
    NoTable,
    Ns,
    Op,
    Structure,
    WorkloadTable,
    peer_sets,
)
from segd.firewall import render
from segd.firewall.gate import (
    PORT_RE,
    GateEntry,
    render_gate,
    render_gate_add,
    render_gate_remove,
    render_gate_subnets,
)
from segd.firewall.plan import Plan
from segd.wire import WorkloadPolicy


class Desired(msgspec.Struct, frozen=True):
    """What one container's namespace should hold."""

    kind: Kind
    ns: Ns
    policy: WorkloadPolicy | None = None
    table: WorkloadTable | None = None  # for a workload
    invalid: str = ""  # why its workload cannot be rendered (it is isolated instead)


def desired(host: Host, cid: str) -> Desired | None:
    """None for a container that does not own its namespace (or is not running).
    A workload whose policy or peer sets cannot be rendered is isolated (fail
    closed), with the reason."""
    info = host.containers.get(cid)
    if info is None or not host.owner(cid):
        return None
    ns = Ns(key=cid, path=info.netns_path)
    pol = host.workloads.get(cid)
    if pol is not None and pol.mode == "idle":
        return Desired("exempt", ns, pol)
    if pol is not None:
        try:
            render.check_policy(pol)
        except ValueError as e:
            return Desired("isolated", ns, invalid=str(e))
        names = sorted(render.referenced_sets(pol))
        if bad := [f"{n}: {host.bad_sets[n]}" for n in names if n in host.bad_sets]:
            return Desired("isolated", ns, invalid="; ".join(bad))
        sets = host.peer_sets
        allows = [*pol.inbound, *pol.outbound]
        structure = Structure(
            inbound=tuple(pol.inbound),
            outbound=tuple(pol.outbound),
            logged=host.logged & {a.rule_id for a in allows},
            mode=pol.mode,
            level=pol.visibility,
        )
        table = WorkloadTable(structure, {n: sets.get(n, []) for n in names})
        return Desired("workload", ns, pol, table)
    if info.pairing_key or host.isolate_unkeyed:
        return Desired("isolated", ns)
    return Desired("exempt", ns)


def _ours(rec: Enforced) -> bool:
    """Whether the namespace holds (or may hold) a table the agent put there."""
    if rec.table is None:
        return rec.kind in ("workload", "isolated")
    return not isinstance(rec.table, NoTable)


def table_current(rec: Enforced, want: Desired) -> bool:
    """Whether the container's table is what `want` says (cheap: nothing rendered)."""
    if want.kind == "exempt":
        return rec.kind == "exempt" and not _ours(rec)
    if want.kind == "isolated":
        return isinstance(rec.table, IsolationTable)
    return rec.table == want.table


def table_op(rec: Enforced, want: Desired) -> ApplyTable | None:
    """The apply that brings the container's table to `want`; None when it is there."""
    if table_current(rec, want):
        return None
    ns, kind = rec.ns, want.kind
    if kind == "exempt":
        if _ours(rec):
            return ApplyTable(ns.key, ns, kind, render.render_removal(), NoTable(), listed=False)
        return ApplyTable(ns.key, ns, kind, None, rec.table, listed=False)  # unknown: left alone
    was = peer_sets(rec.table)
    if kind == "isolated":
        return ApplyTable(ns.key, ns, kind, render.render_isolation(was=was), IsolationTable())
    target, pol = want.table, want.policy
    assert target is not None and pol is not None
    if isinstance(rec.table, WorkloadTable) and rec.table.structure == target.structure:
        # Elements only. Refused: the table is not what we left (tampered, or a new
        # namespace); it is then unknown, and the next step replaces it whole.
        delta = _delta(rec.table.sets, target.sets)
        return ApplyTable(ns.key, ns, kind, delta, target, refused="unknown")
    plan = render.render_workload(pol, target.sets, target.structure.logged, was=was)
    return ApplyTable(ns.key, ns, kind, plan, target)


def _delta(old: dict[str, list[str]], new: dict[str, list[str]]) -> Plan | None:
    """The element changes from `old` to `new` (same set names). Only the
    addresses that differ reach the renderer, which validates each."""
    gone: dict[str, list[str]] = {}
    came: dict[str, list[str]] = {}
    for name, after in new.items():
        before = old.get(name, [])
        if before != after:
            b, a = set(before), set(after)
            gone[name], came[name] = sorted(b - a), sorted(a - b)
    return render.render_set_delta(gone, came, gone) if gone else None


def gate_entries(host: Host, cid: str, rec: Enforced, want: Desired | None) -> frozenset[GateEntry]:
    """What the gate should admit for a container: its addresses on their bridge
    ports, once its table (workload) or its exemption is in place. A workload's
    only as far as the server paired them: an address it took since (a network
    attached) waits for its pairing, and stays out if that is refused."""
    info = host.containers.get(cid)
    if want is None or info is None or rec.ports is None:
        return frozenset()
    if rec.kind != want.kind and not _mode_switch(rec, want):
        return frozenset()
    if want.kind == "isolated":
        return frozenset()
    ports = rec.ports  # only bridge ports the gate looks at can admit anything
    paired = info.ips if want.policy is None else want.policy.ips
    return frozenset(
        GateEntry(ports[ip], ip)
        for ip in info.ips
        if ip in ports and ip in paired and PORT_RE.match(ports[ip])
    )


def _mode_switch(rec: Enforced, want: Desired) -> bool:
    """A paired workload going to or from mode `idle`: admitted before, during
    and after (its table comes or goes; the gate entry stays)."""
    kinds = {rec.kind, want.kind}
    return want.policy is not None and kinds == {"workload", "exempt"}


def _needs_ports(host: Host, rec: Enforced, want: Desired) -> bool:
    """Keyed containers look their ports up while their pairing is in flight."""
    info = host.containers[rec.ns.key]
    return rec.ports is None and (want.kind != "isolated" or bool(info.pairing_key))


class Step(msgspec.Struct, frozen=True):
    """The next kernel operations, in order, and the containers of the batch that
    need none (done, or failed and out of the gate)."""

    ops: list[Op]
    idle: frozenset[str]
    invalid: dict[str, str] = {}  # containers isolated because their workload cannot be rendered


REST_CHUNK = 8
"""At most this many changes to tables already of their kind per step, so a
container waiting for its first table is never long behind its peers' updates."""

_URGENCY = {"workload": 0, "exempt": 1, "isolated": 2}
"""Which first table goes first: the gate holds every container until it is
admitted, so the tables that let traffic through matter most."""


@dataclass
class _Plan:
    """What each container of a batch needs, before it is ordered into ops."""

    remove: dict[Ns, frozenset[GateEntry]] = field(default_factory=dict)
    add: dict[Ns, frozenset[GateEntry]] = field(default_factory=dict)
    first: list[ApplyTable] = field(default_factory=list)  # tables of another kind
    rest: list[ApplyTable] = field(default_factory=list)  # tables rewritten in place
    ports: dict[str, LookupPorts] = field(default_factory=dict)
    verify: list[ListTable] = field(default_factory=list)  # read before anything else
    idle: set[str] = field(default_factory=set)
    invalid: dict[str, str] = field(default_factory=dict)


def step(host: Host, batch: Set[str], failed: Set[str]) -> Step:
    """The next kernel operations for the containers of `batch`; no ops when they
    (and the gate) are where they should be. `failed`: containers whose work
    failed in this batch ("gate": the gate's)."""
    plan = _Plan(remove={RETIRED: frozenset(host.ungate)} if host.ungate else {})
    for cid in sorted(batch):
        _plan_container(host, cid, failed, plan)
    ops = _gate_ops(host, failed, plan)
    ops += [Forget(ns.key, ns) for ns in host.unbind]
    ops += plan.verify
    # Most urgent first: when something happens during a step, the rest of it
    # is planned again (only its first op is sure to run).
    if plan.first:
        # One first table per step: its gate entries come at the head of the next.
        op = min(plan.first, key=lambda o: (_URGENCY[o.kind], o.container))
        ops.append(op)
        rec, want = host.enforced[op.container], desired(host, op.container)
        if want is not None and _needs_ports(host, rec, want):
            ops.append(LookupPorts(op.container, rec.ns))
    ops += plan.ports.values()  # cheap, and what admitting a container waits for
    if not plan.first:
        ops += plan.rest[:REST_CHUNK]
    pending = plan.first or plan.rest or plan.ports or plan.verify
    if host.gate == "initial" and host.listed and not pending and "gate" not in failed:
        ops.append(_rebuild(host, failed))  # tables first, then the gate whole, once
    return Step(ops, frozenset(plan.idle), plan.invalid)


def _plan_container(host: Host, cid: str, failed: Set[str], plan: _Plan) -> None:
    """Note what one container needs: gate entries to add or remove, its table, a
    read of its ports; or that it needs nothing (idle)."""
    rec = host.enforced.get(cid)
    want = desired(host, cid)
    if rec is None or want is None:
        plan.idle.add(cid)
        return
    if want.invalid:
        plan.invalid[cid] = want.invalid
    if cid in host.unverified and cid not in failed:
        plan.verify.append(ListTable(cid, rec.ns))  # is it the namespace it was paired in?
        return
    wanted = frozenset() if cid in failed else gate_entries(host, cid, rec, want)
    if rec.gated - wanted:
        plan.remove[rec.ns] = rec.gated - wanted
    if wanted - rec.gated and host.gate == "ok":
        plan.add[rec.ns] = wanted - rec.gated
    op = None if cid in failed else table_op(rec, want)
    if op is not None:
        (plan.first if op.kind != rec.kind else plan.rest).append(op)
    elif cid not in failed and _needs_ports(host, rec, want):
        plan.ports[cid] = LookupPorts(cid, rec.ns)
    elif rec.ns not in plan.remove and rec.ns not in plan.add:
        plan.idle.add(cid)


def _gate_ops(host: Host, failed: Set[str], plan: _Plan) -> list[Op]:
    """The gate's part of a step: rebuilt whole, or changed by the batch's entries."""
    if "gate" in failed:
        return []  # the gate could not be rebuilt: left alone until the next batch
    if host.gate == "rebuild":
        return [_rebuild(host, failed)]  # before anything else, like a removal
    ops: list[Op] = []
    if host.gate == "ok":
        for what, entries in (("remove", plan.remove), ("add", plan.add)):
            if entries:
                ops.append(_change(what, entries))
        if host.subnets != host.gate_subnets:
            ops.append(GateSubnets(host.subnets, render_gate_subnets(host.subnets)))
    return ops


def _union(entries: dict[Ns, frozenset[GateEntry]]) -> frozenset[GateEntry]:
    out: set[GateEntry] = set()
    for these in entries.values():
        out |= these
    return frozenset(out)


def _change(what: str, entries: dict[Ns, frozenset[GateEntry]]) -> GateChange:
    if what == "add":
        plan = render_gate_add(_union(entries))
        assert plan is not None
        return GateChange("add", entries, plan)
    plan = render_gate_remove(_union(entries))
    assert plan is not None
    return GateChange("remove", entries, plan)


def _rebuild(host: Host, failed: Set[str]) -> GateRebuild:
    """The whole gate: exactly what every container in place should have admitted."""
    entries: dict[Ns, frozenset[GateEntry]] = {}
    for cid, rec in host.enforced.items():
        if cid not in failed and (e := gate_entries(host, cid, rec, desired(host, cid))):
            entries[rec.ns] = e
    plan = render_gate(_union(entries), host.subnets)
    return GateRebuild(entries, host.subnets, plan, host.gate_reason)


def in_place(host: Host, cid: str, failed: Set[str]) -> bool:
    """Whether a container's table is the one its policy says (its peer sets may
    still lag behind the newest version) and the gate admits exactly what it should."""
    rec = host.enforced.get(cid)
    want = desired(host, cid)
    if rec is None or want is None or cid in failed:
        return False
    if rec.kind != want.kind or _needs_ports(host, rec, want):
        return False
    if isinstance(rec.table, WorkloadTable) and want.table is not None:
        shaped = rec.table.structure == want.table.structure
    else:
        shaped = table_current(rec, want)
    return shaped and (host.gate == "initial" or rec.gated == gate_entries(host, cid, rec, want))


def drift_checks(host: Host) -> list[Op]:
    """Read back every table the agent left (and the gate) to compare."""
    ops: list[Op] = [
        ListTable(cid, rec.ns)
        for cid, rec in sorted(host.enforced.items())
        if isinstance(rec.table, (WorkloadTable, IsolationTable)) and rec.listing is not None
    ]
    if host.gate != "initial":
        ops.append(ListGate())
    return ops
