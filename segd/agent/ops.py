"""Kernel operations the reconciler asks for, and what became of each (pure values).

`reconcile.step` returns a list of `Op`s; the executor runs them in order
through the root module and answers each with a `Result` (`Done` or `Failed`);
`reconcile.absorb` turns results into what the agent now knows. Each op says
why it exists in its fields, so a result can be understood without the state
that produced it.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from segd.firewall.gate import GateEntry
from segd.firewall.plan import Plan
from segd.wire import Allow, Mode, VisibilityLevel

Kind = Literal["workload", "isolated", "exempt"]
"""What one container's namespace should hold (see `segd.agent.reconcile`); a
paired workload in mode `idle` is `exempt`: no table, admitted by the gate."""


class Ns(msgspec.Struct, frozen=True):
    """A container's network namespace: the container id and the path to open."""

    key: str
    path: str


RETIRED = Ns("", "")
"""Where gate entries of containers gone, restarted or no longer owners are filed."""


# ---- what a namespace's table holds ----------------------------------------------------


class Structure(msgspec.Struct, frozen=True):
    """Everything of a workload's table but set elements: equal -> a delta is enough."""

    inbound: tuple[Allow, ...]
    outbound: tuple[Allow, ...]
    logged: frozenset[str]  # ids of the policy's rules whose accepts are logged
    mode: Mode = "full"  # a mode switch rewrites the table (no container restart)
    level: VisibilityLevel = "off"


class WorkloadTable(msgspec.Struct, frozen=True, tag="workload"):
    structure: Structure
    sets: dict[str, list[str]]  # every referenced set -> its addresses


class IsolationTable(msgspec.Struct, frozen=True, tag="isolation"):
    pass


class NoTable(msgspec.Struct, frozen=True, tag="none"):
    """No segd table: removed by us, or a namespace made after the agent saw it start."""


TableState = WorkloadTable | IsolationTable | NoTable


def peer_sets(table: TableState | None) -> set[str] | None:
    """The peer sets the table holds (what an in-place rewrite must drop);
    None when the table is unknown."""
    if table is None:
        return None
    return set(table.sets) if isinstance(table, WorkloadTable) else set()


# ---- operations ------------------------------------------------------------------------


class ApplyTable(msgspec.Struct, frozen=True, tag="apply"):
    """Bring one container's namespace to `table` (None: unknown afterwards) by
    running `plan` (None: nothing to run) and, with `listed`, list the table.

    `refused`: what a refusal by nft means. "fail": the container failed (it
    leaves the gate until its next batch); "unknown": the table is not what the
    agent thought, and is to be replaced whole."""

    container: str
    ns: Ns
    kind: Kind
    plan: Plan | None
    table: TableState | None
    listed: bool = True
    refused: Literal["fail", "unknown"] = "fail"


class LookupPorts(msgspec.Struct, frozen=True, tag="ports"):
    """Find the host-side bridge port behind each of the container's addresses."""

    container: str
    ns: Ns


class Forget(msgspec.Struct, frozen=True, tag="forget"):
    """Free what the kernel module keeps for a namespace the agent no longer enforces."""

    container: str
    ns: Ns


class GateChange(msgspec.Struct, frozen=True, tag="gate"):
    """Admit (`add`) or stop admitting (`remove`) entries, per container namespace
    (`RETIRED` for entries no container holds any more)."""

    what: Literal["add", "remove"]
    entries: dict[Ns, frozenset[GateEntry]]
    plan: Plan


class GateRebuild(msgspec.Struct, frozen=True, tag="gate_rebuild"):
    """The whole gate again: exactly `entries`, guarding `subnets`. `reason`, when
    set, is the change that failed before (reported as tampering once rebuilt)."""

    entries: dict[Ns, frozenset[GateEntry]]
    subnets: tuple[str, ...]
    plan: Plan
    reason: str = ""


class GateSubnets(msgspec.Struct, frozen=True, tag="gate_subnets"):
    subnets: tuple[str, ...]
    plan: Plan


class ListTable(msgspec.Struct, frozen=True, tag="list"):
    """Read a container's table to compare it with what the agent left (drift)."""

    container: str
    ns: Ns


class ListGate(msgspec.Struct, frozen=True, tag="list_gate"):
    pass


Op = (
    ApplyTable
    | LookupPorts
    | Forget
    | GateChange
    | GateRebuild
    | GateSubnets
    | ListTable
    | ListGate
)


# ---- results ---------------------------------------------------------------------------


class Done(msgspec.Struct, frozen=True):
    op: Op
    listing: str | None = None  # ApplyTable (listed), ListTable, ListGate
    ports: dict[str, str] | None = None  # LookupPorts


class Failed(msgspec.Struct, frozen=True):
    op: Op
    error: str
    gone: bool = False  # the namespace no longer exists (the container died meanwhile)


Result = Done | Failed


def container_of(op: Op) -> str:
    """The container an op works for; "" for the gate's."""
    match op:
        case ApplyTable(container=c) | LookupPorts(container=c) | Forget(container=c):
            return c
        case ListTable(container=c):
            return c
    return ""


def containers_of(op: Op) -> list[str]:
    """Every container an op works for (a gate change: each whose entries change)."""
    if isinstance(op, GateChange):
        return [ns.key for ns in op.entries if ns.key]
    cid = container_of(op)
    return [cid] if cid else []
