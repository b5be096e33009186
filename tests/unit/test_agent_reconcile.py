"""The agent's pure core: `Host` fed events and kernel results, `reconcile.step`
deciding the kernel work. Tables of situations -> the ops that follow, written
as short lines ("apply web workload", "gate add web", ...)."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest

from segd.agent import reconcile
from segd.agent.events import (
    ContainerGone,
    ContainerInfo,
    ContainerSeen,
    HostEvent,
    InstructionsAccepted,
    Listed,
    MeshState,
    Paired,
    PairingRefused,
    SubnetsSeen,
)
from segd.agent.host import Host, Report, affected
from segd.agent.ops import (
    ApplyTable,
    Done,
    Failed,
    Forget,
    GateChange,
    GateRebuild,
    GateSubnets,
    IsolationTable,
    ListGate,
    ListTable,
    LookupPorts,
    Op,
    Result,
    WorkloadTable,
)
from segd.policy import Service
from segd.wire import Allow, Instructions, Mode, Rule, VisibilityLevel, WorkloadPolicy

WEB_SET = "ls_0000000000000eb0"
DB_SET = "ls_00000000000000db"
TCP5432 = Service("tcp", 5432, 5432)
SUBNETS = ("172.17.0.0/16",)

# name -> (pid, ip); the container id is the name (ids only need to be strings here)
BOX = {"web": (101, "172.17.0.2"), "db": (102, "172.17.0.3"), "cache": (103, "172.17.0.4")}


def info(name: str, *, key: str = "k", pid: int = 0, mode: str = "bridge") -> ContainerInfo:
    p, ip = BOX.get(name, (200, "172.17.0.9"))
    return ContainerInfo(
        id=name,
        name=name,
        pid=pid or p,
        ips=[ip],
        networks={"bridge": ip},
        pairing_key=key,
        requested_labels={},
        host_network=mode == "host",
        network_mode=mode,
    )


def seen(
    name: str, *, started: bool = False, key: str = "k", pid: int = 0, mode: str = "bridge"
) -> ContainerSeen:
    c = info(name, key=key, pid=pid, mode=mode)
    ns = (4, 1000 + c.pid) if not c.joins else (4, 1000 + BOX[c.joins][0])
    return ContainerSeen(c, ns, started)


def policy(cid: str, inbound: str = "", outbound: str = "") -> WorkloadPolicy:
    """A workload; `inbound`/`outbound` name a peer set ("web", "db") or nothing."""
    sets = {"web": WEB_SET, "db": DB_SET}

    def allows(peer: str) -> list[Allow]:
        return [Allow("r1", sets[peer], [TCP5432])] if peer else []

    return WorkloadPolicy(
        workload_id="w-" + cid,
        container_id=cid,
        labels={"role": cid},
        ips=[BOX[cid][1]],
        inbound=allows(inbound),
        outbound=allows(outbound),
    )


def instructions(
    version: int, *pols: WorkloadPolicy, web: tuple[str, ...] = (), db: tuple[str, ...] = ()
) -> InstructionsAccepted:
    sets = {WEB_SET: [BOX[n][1] for n in web], DB_SET: [BOX[n][1] for n in db]}
    rules = [Rule("r1", [{"role": "db"}], [{"role": "web"}], ["tcp/5432"])]
    instr = Instructions(host_id="h", version=version, workloads=list(pols), sets=sets, rules=rules)
    return InstructionsAccepted(instr)


# web -> db on tcp/5432: db accepts from the web set, web may reach the db set
V1 = instructions(
    1, policy("web", outbound="db"), policy("db", inbound="web"), web=("web",), db=("db",)
)


def host(*events: HostEvent, isolate_unkeyed: bool = True) -> Host:
    h = Host(isolate_unkeyed=isolate_unkeyed, host_ns=frozenset({(4, 1)}))
    for ev in events:
        h.on(ev)
    return h


def say(op: Op) -> str:
    """An op as a short line: what, for whom, and which plan."""
    match op:
        case ApplyTable(container=c, kind=kind, plan=plan):
            return f"apply {c} {kind} {plan.what if plan else '-'}"
        case LookupPorts(container=c):
            return f"ports {c}"
        case Forget(container=c):
            return f"forget {c}"
        case GateChange(what=what, entries=entries):
            return f"gate {what} " + ",".join(sorted(ns.key or "retired" for ns in entries))
        case GateRebuild(entries=entries, reason=reason):
            names = ",".join(sorted(ns.key for ns in entries)) or "-"
            return f"gate rebuild {names}" + (" (after failure)" if reason else "")
        case GateSubnets(subnets=subnets):
            return "gate subnets " + ",".join(subnets)
        case ListTable(container=c):
            return f"list {c}"
        case ListGate():
            return "list gate"
    raise AssertionError(op)


def ok(op: Op) -> Result:
    """What a healthy kernel answers (each container's addresses behind `veth<name>`)."""
    match op:
        case ApplyTable(container=c, listed=True):
            return Done(op, listing=f"table of {c} #{id(op)}")
        case LookupPorts(container=c):
            return Done(op, ports={ip: f"veth{c}" for ip in ADDRESSES.get(c, [BOX[c][1]])})
    return Done(op)


ADDRESSES: dict[str, list[str]] = {}  # a container's addresses, when not its BOX one


Kernel = Callable[[Op], Result]


class Run:
    """Steps until nothing is left, answering with `kernel`; what ran, step by step."""

    def __init__(self, h: Host, kernel: Kernel = ok) -> None:
        self.h, self.kernel = h, kernel
        self.failed: set[str] = set()
        self.reports: list[Report] = []

    def steps(self, batch: set[str] | None = None, limit: int = 50) -> list[list[str]]:
        todo = set(self.h.take_dirty()) if batch is None else batch
        out: list[list[str]] = []
        for _ in range(limit):
            todo |= self.h.take_dirty()
            s = reconcile.step(self.h, todo, self.failed)
            todo -= s.idle
            if not s.ops:
                return out
            out.append([say(op) for op in s.ops])
            for op in s.ops:
                self.reports += self.h.absorb(self.kernel(op), self.failed)
        raise AssertionError(f"no end after {limit} steps: {out[-3:]}")

    def flat(self) -> list[str]:
        return [line for step in self.steps() for line in step]


def synced(*events: HostEvent, isolate_unkeyed: bool = True) -> Host:
    """A host after its first sync with these events (every op succeeded)."""
    h = host(SubnetsSeen(SUBNETS), *events, Listed(), isolate_unkeyed=isolate_unkeyed)
    Run(h).steps()
    assert h.gate == "ok"
    return h


# ---- the first sync -------------------------------------------------------------------


def kept_tables(op: Op) -> Result:
    """A healthy kernel whose namespaces still hold the tables an earlier run of
    the agent left (it restarted; the containers did not)."""
    if isinstance(op, ListTable):
        return Done(op, listing=f"table of {op.container} from before")
    return ok(op)


def test_first_sync_tables_first_then_the_gate_whole_once() -> None:
    h = host(SubnetsSeen(SUBNETS), V1, seen("web"), seen("db"), seen("cache", key=""), Listed())
    assert Run(h, kept_tables).steps() == [
        # paired containers in namespaces not seen being made: still theirs?
        ["list db", "list web", "apply cache isolated isolation_replace"],
        ["apply db workload workload_replace", "ports db"],  # unknown namespaces: replaced
        ["apply web workload workload_replace", "ports web"],
        ["gate rebuild db,web"],  # the unkeyed cache is isolated: never admitted
    ]
    assert h.enforced["web"].gated == {("vethweb", "172.17.0.2")}
    assert h.gate_subnets == SUBNETS
    assert h.take_restarted() == set()


def test_a_paired_container_restarted_while_the_agent_was_stopped_is_paired_again() -> None:
    """The agent (or the host) restarted: a paired container whose namespace holds
    no table is in a new one (its restart was missed, a reboot among them), and
    is unpaired and paired again; one whose table is still there is not. A read
    that fails tells nothing."""

    def kernel(op: Op) -> Result:
        if isinstance(op, ListTable) and op.container == "web":
            return Done(op, listing="table of web from before")
        if isinstance(op, ListTable) and op.container == "cache":
            return Failed(op, "namespace unreadable")
        return ok(op)

    cache = msgspec.structs.replace(policy("cache"), ips=[BOX["cache"][1]])
    v1 = instructions(
        1, policy("web", outbound="db"), policy("db", inbound="web"), cache, web=("web",)
    )
    h = host(SubnetsSeen(SUBNETS), v1, seen("web"), seen("db"), seen("cache"), Listed())
    Run(h, kernel).steps()
    assert h.take_restarted() == {"db"}
    assert h.unverified == set()
    assert isinstance(h.enforced["db"].table, WorkloadTable)  # enforced meanwhile, as live
    # A workload in mode idle has no table to find: it is not read, nor paired again.
    idle = msgspec.structs.replace(policy("db"), mode="idle")
    h = host(SubnetsSeen(SUBNETS), instructions(1, idle), seen("db"), Listed())
    assert "list db" not in Run(h).flat()
    assert h.take_restarted() == set()


def test_no_gate_before_docker_was_listed() -> None:
    """Instructions may come before the first sync: nothing is built from an
    empty list of containers (it would shut every container out)."""
    h = host(SubnetsSeen(SUBNETS), V1)
    assert Run(h).steps(batch=set()) == []


def test_a_container_started_after_the_sync_is_known_clean() -> None:
    h = synced()
    h.on(seen("web", started=True))
    assert Run(h).steps() == [["apply web isolated isolation", "ports web"]]  # in place


def test_a_container_seen_by_a_restarted_agent_is_not_known_clean() -> None:
    h = synced()
    h.on(seen("web"))  # a full reconcile, not an event: who knows what its table holds
    assert Run(h).flat() == ["apply web isolated isolation_replace", "ports web"]


# ---- pairing and instructions --------------------------------------------------------


def test_paired_container_first_then_its_gate_entry_then_its_peers() -> None:
    h = synced(seen("db", started=True), instructions(1, policy("db", inbound="web")))
    h.on(seen("web", started=True))
    assert Run(h).flat() == ["apply web isolated isolation", "ports web"]
    h.on(V1)  # web paired: its workload, and db's web set now holds it
    assert Run(h).steps() == [
        ["apply web workload workload"],  # in place: the agent made its isolation table
        ["gate add web", "apply db workload set_delta"],
    ]


def test_the_table_that_lets_traffic_through_goes_before_isolation_tables() -> None:
    h = synced(seen("db", started=True), instructions(1, policy("db", inbound="web")))
    h.on(seen("cache", started=True, key=""))
    h.on(seen("web", started=True))
    h.on(instructions(2, policy("web", outbound="db"), policy("db", inbound="web"), web=("web",)))
    assert Run(h).steps() == [
        ["apply web workload workload", "ports web"],
        ["gate add web", "apply cache isolated isolation"],
        ["apply db workload set_delta"],
    ]


def test_versions_that_arrive_together_are_applied_once() -> None:
    h = synced(seen("web"), seen("db"), V1)
    for v in range(2, 7):  # db's web set grows and shrinks; the last version wins
        web = ("web",) if v % 2 else ()
        h.on(instructions(v, *V1.instructions.workloads, web=web, db=("db",)))
    assert Run(h).flat() == ["apply db workload set_delta"]
    assert isinstance(h.enforced["db"].table, WorkloadTable)
    assert h.enforced["db"].table.sets[WEB_SET] == []


def test_a_version_touches_only_the_containers_it_changed() -> None:
    h = synced(seen("web"), seen("db"), seen("cache"), V1)
    h.on(instructions(2, policy("web", outbound="db"), policy("db", inbound="web"), db=("db",)))
    assert h.take_dirty() == {"db"}  # web's set left db's table; web's own is unchanged


AFFECTED: dict[str, tuple[InstructionsAccepted, set[str]]] = {
    "nothing changed": (
        instructions(2, *V1.instructions.workloads, web=("web",), db=("db",)),
        set(),
    ),
    "a peer left a set": (
        instructions(2, *V1.instructions.workloads, web=(), db=("db",)),
        {"db"},
    ),
    "a set nobody here refers to": (
        instructions(2, policy("web", outbound="db"), web=("web",), db=("db",)),
        {"db"},  # db's workload is gone (unpaired)
    ),
    "a policy changed": (
        instructions(
            2,
            policy("web", outbound="db", inbound="db"),
            policy("db", inbound="web"),
            web=("web",),
            db=("db",),
        ),
        {"web"},
    ),
    "labels of a workload only": (
        instructions(
            2,
            WorkloadPolicy(
                "w-web", "web", {"role": "x"}, [BOX["web"][1]], [], [Allow("r1", DB_SET, [TCP5432])]
            ),
            policy("db", inbound="web"),
            web=("web",),
            db=("db",),
        ),
        set(),
    ),
    # its table is the same, but the gate admits only the addresses it was paired with
    "addresses of a workload": (
        instructions(
            2,
            WorkloadPolicy(
                "w-web", "web", {"role": "web"}, ["10.0.0.9"], [], [Allow("r1", DB_SET, [TCP5432])]
            ),
            policy("db", inbound="web"),
            web=("web",),
            db=("db",),
        ),
        {"web"},
    ),
}


@pytest.mark.parametrize("case", AFFECTED)
def test_affected_containers(case: str) -> None:
    new, want = AFFECTED[case]
    assert affected(V1.instructions, new.instructions) == want


def test_logging_a_rule_affects_the_containers_that_use_it() -> None:
    new = V1.instructions
    logged = Instructions(
        host_id="h",
        version=2,
        workloads=new.workloads,
        sets=new.sets,
        rules=[Rule("r1", [{"role": "db"}], [{"role": "web"}], ["tcp/5432"], options=["log"])],
    )
    assert affected(new, logged) == {"web", "db"}


# ---- failures and their fallbacks ----------------------------------------------------------


def refuse(pred: Callable[[Op], bool], *, gone: bool = False) -> Kernel:
    def kernel(op: Op) -> Result:
        return Failed(op, "Error: Could not process rule", gone=gone) if pred(op) else ok(op)

    return kernel


def test_refused_delta_replaces_the_table_whole_and_keeps_it_admitted() -> None:
    h = synced(seen("web"), seen("db"), V1)
    h.on(instructions(2, *V1.instructions.workloads, web=(), db=("db",)))

    def delta(op: Op) -> bool:
        return isinstance(op, ApplyTable) and op.plan is not None and op.plan.what == "set_delta"

    assert Run(h, refuse(delta)).steps() == [
        ["apply db workload set_delta"],
        ["apply db workload workload_replace"],  # not what we left: replaced whole
    ]
    assert h.enforced["db"].gated  # never left the gate


def test_failed_table_leaves_the_gate_and_is_not_tried_again_in_the_batch() -> None:
    h = synced(seen("web"), seen("db"), V1)
    h.on(
        instructions(
            2,
            policy("web", outbound="db", inbound="db"),
            policy("db", inbound="web"),
            web=("web",),
            db=("db",),
        )
    )
    run = Run(h, refuse(lambda op: isinstance(op, ApplyTable)))
    assert run.steps() == [["apply web workload workload"], ["gate remove web"]]
    assert "web" in run.failed and h.enforced["web"].kind is None
    h.dirty.add("web")  # news about it (an event, the periodic reconcile): tried again
    run.failed.discard("web")
    assert Run(h).steps() == [["apply web workload workload_replace"], ["gate add web"]]


def test_container_gone_while_its_table_was_applied() -> None:
    h = synced(seen("web"))
    h.on(V1)
    run = Run(h, refuse(lambda op: isinstance(op, ApplyTable), gone=True))
    assert run.flat() == ["apply web workload workload"]
    h.on(ContainerGone("web"))
    assert Run(h).flat() == ["forget web"]
    assert h.enforced == {}


def test_failed_gate_change_rebuilds_the_gate_first_and_reports_it() -> None:
    h = synced(seen("web"), seen("db"))
    h.on(V1)
    run = Run(h, refuse(lambda op: isinstance(op, GateChange)))
    assert run.steps() == [
        ["apply db workload workload"],
        ["gate add db", "apply web workload workload"],
        ["gate rebuild db,web (after failure)"],
    ]
    assert [r.detail for r in run.reports] == [
        "host gate changed outside segd: Error: Could not process rule"
    ]
    assert h.gate == "ok" and h.enforced["web"].gated and h.enforced["db"].gated


def test_failed_rebuild_leaves_the_gate_alone_for_the_batch() -> None:
    h = synced(seen("web"), V1)
    h.gate = "rebuild"
    h.dirty.add("web")
    run = Run(h, refuse(lambda op: isinstance(op, GateRebuild)))
    assert run.steps() == [["gate rebuild web"]]
    assert "gate" in run.failed and h.gate == "rebuild"


# ---- containers come and go -------------------------------------------------------------


def test_gone_container_leaves_the_gate_before_anything_else() -> None:
    h = synced(seen("web"), seen("db"), V1)
    h.on(ContainerGone("web"))
    h.on(instructions(2, policy("db", inbound="web"), db=("db",)))  # web unpaired
    assert Run(h).steps() == [
        ["gate remove retired", "forget web", "apply db workload set_delta"],
    ]
    assert "web" not in h.enforced and not h.ungate and not h.unbind


def test_restarted_container_is_enforced_again_in_its_new_namespace() -> None:
    h = synced(seen("web"), seen("db"), V1)
    h.on(seen("web", pid=555, started=True))
    assert Run(h).steps() == [
        ["gate remove retired", "forget web", "apply web workload workload", "ports web"],
        ["gate add web"],
    ]


def test_new_addresses_are_looked_up_again_and_admitted_once_paired() -> None:
    h = synced(seen("web"), V1)
    moved = msgspec.structs.replace(info("web"), ips=["172.17.0.77"])
    h.on(ContainerSeen(moved, (4, 1101)))
    ADDRESSES["web"] = moved.ips
    try:
        # The old address goes; the new one waits for the server to pair it.
        assert Run(h).steps() == [["gate remove web", "ports web"]]
        assert h.enforced["web"].gated == frozenset()
        repaired = msgspec.structs.replace(policy("web", outbound="db"), ips=moved.ips)
        h.on(instructions(2, repaired, policy("db", inbound="web"), db=("db",)))
        assert ["gate add web"] in Run(h).steps()
    finally:
        del ADDRESSES["web"]
    assert h.enforced["web"].gated == {("vethweb", "172.17.0.77")}


def test_an_address_whose_pairing_is_refused_is_never_admitted() -> None:
    """web attached to another network; pairing it again with its new address is
    refused (say, the key was revoked): the workload the server still has stays,
    on its old address, and the new one stays dark."""
    h = synced(seen("web"), V1)
    attached = msgspec.structs.replace(info("web"), ips=[BOX["web"][1], "172.18.0.5"])
    h.on(ContainerSeen(attached, (4, 1101)))
    h.on(PairingRefused("web", "key_revoked: pairing key k has been revoked"))
    ADDRESSES["web"] = attached.ips
    try:
        Run(h).steps()
    finally:
        del ADDRESSES["web"]
    assert h.enforced["web"].gated == {("vethweb", BOX["web"][1])}


def test_a_sidecar_is_never_enforced_and_its_owner_keeps_its_table() -> None:
    h = synced(seen("db"), V1)
    changes = h.on(seen("side", mode="container:db"))
    assert [(c.info.id, c.new.kind) for c in changes] == [("side", "shares")]
    assert Run(h).steps() == []
    assert set(h.enforced) == {"db"}


def test_host_networked_containers_get_nothing() -> None:
    h = synced()
    h.on(ContainerSeen(info("hostnet", mode="host"), (4, 1)))
    assert Run(h).steps() == [] and h.enforced == {}


def test_unkeyed_with_isolation_off_is_admitted_without_a_table() -> None:
    h = synced(isolate_unkeyed=False)
    h.on(seen("cache", key="", started=True))
    assert Run(h).steps() == [["apply cache exempt -", "ports cache"], ["gate add cache"]]


def test_exempt_container_the_agent_had_isolated_loses_its_table() -> None:
    h = synced(seen("cache", key=""))
    assert isinstance(h.enforced["cache"].table, IsolationTable)
    h.isolate_unkeyed = False
    h.dirty.add("cache")
    assert Run(h).flat() == ["apply cache exempt removal", "ports cache", "gate add cache"]


def test_subnets_change_goes_to_the_gate() -> None:
    h = synced()
    h.on(SubnetsSeen(("172.17.0.0/16", "172.30.0.0/16")))
    assert Run(h).flat() == ["gate subnets 172.17.0.0/16,172.30.0.0/16"]


def test_result_for_a_namespace_replaced_meanwhile_is_ignored() -> None:
    h = synced(seen("web"))
    op = ApplyTable("web", h.enforced["web"].ns, "isolated", None, IsolationTable())
    h.on(seen("web", pid=777, started=True))  # restarted while `op` ran
    h.absorb(Done(op, listing="old"), set())
    assert h.enforced["web"].listing is None and h.enforced["web"].kind is None


# ---- drift ---------------------------------------------------------------------------------


def test_changed_table_is_replaced_whole_and_reported() -> None:
    h = synced(seen("web"), seen("db"), V1)
    checks = reconcile.drift_checks(h)
    assert [say(op) for op in checks] == ["list db", "list web", "list gate"]
    reports: list[Report] = []
    for op in checks:
        if isinstance(op, ListTable) and op.container == "db":
            reports += h.absorb(Done(op, listing=None), set())  # flushed from inside
        elif isinstance(op, ListTable):
            reports += h.absorb(Done(op, listing=h.enforced[op.container].listing), set())
        else:
            reports += h.absorb(Done(op, listing="the gate"), set())
    assert reports == [Report("db", "namespace table changed outside segd; repaired", False)]
    assert Run(h).flat() == ["apply db workload workload_replace"]


def test_missing_gate_is_rebuilt_and_reported() -> None:
    h = synced(seen("web"), V1)
    reports = h.absorb(Done(ListGate(), listing=None), set())
    assert [r.detail for r in reports] == ["host gate table missing; rebuilt"]
    assert Run(h).flat() == ["gate rebuild web"]


# ---- pairing decisions ---------------------------------------------------------------------


PAIRING: dict[str, tuple[list[HostEvent], set[str], bool]] = {
    "keyed, not paired": ([seen("web")], set(), True),
    "unkeyed": ([seen("web", key="")], set(), False),
    "pairing under way": ([seen("web")], {"web"}, False),
    "refused": ([seen("web"), PairingRefused("web", "revoked")], set(), False),
    "paired": ([seen("web"), V1], set(), False),
    "paired with other addresses (restarted)": (
        [seen("web"), instructions(1, WorkloadPolicy("w", "web", {}, ["10.9.9.9"], [], []))],
        set(),
        True,
    ),
    "answered, its version not here yet": (
        [seen("web"), Paired("web", 7, ["172.17.0.2"])],
        set(),
        False,
    ),
    "a sidecar": ([seen("db"), seen("side", mode="container:db")], set(), False),
}


@pytest.mark.parametrize("case", PAIRING)
def test_needs_pairing(case: str) -> None:
    events, in_flight, want = PAIRING[case]
    h = host(*events)
    cid = "side" if "sidecar" in case else "web"
    assert h.needs_pairing(cid, in_flight) is want


def test_stale_workloads_are_those_not_running_here_or_sharing() -> None:
    h = host(seen("db"), seen("side", mode="container:db"))
    h.on(instructions(1, policy("db"), policy("web"), WorkloadPolicy("w", "side", {}, [], [], [])))
    assert sorted(h.stale_workloads(set())) == ["side", "web"]
    assert h.stale_workloads({"web"}) == ["side"]  # still pairing: not stale


def test_answer_without_instructions_waits_for_the_long_poll() -> None:
    h = synced(seen("web", started=True))
    h.on(Paired("web", 3, ["172.17.0.2"]))
    assert h.awaiting and Run(h).steps() == []  # isolated until instructions bring it
    h.on(instructions(3, policy("web")))
    assert not h.awaiting
    assert Run(h).flat() == ["apply web workload workload", "gate add web"]


# ---- a full listing of Docker against events folded meanwhile ------------------------


def test_listing_against_events_folded_while_docker_listed() -> None:
    h = host(seen("web"), seen("db"))
    since = h.revision  # the listing begins: web and db run
    h.on(ContainerGone("db"))  # db dies while Docker lists
    h.on(seen("cache"))  # cache starts while Docker lists
    running = {"web": info("web"), "db": info("db")}  # what the listing says
    gone, again = h.listing(running, since)
    assert gone == [] and [c.id for c in again] == ["web"]
    # A later listing that no longer shows web: gone; db's death is forgotten.
    gone, again = h.listing({"cache": info("cache")}, h.revision)
    assert gone == ["web"] and [c.id for c in again] == ["cache"] and h.gone_at == {}


def test_a_workload_that_cannot_be_rendered_is_isolated_and_the_rest_enforced() -> None:
    h = synced(seen("web"), seen("db"), seen("cache"))
    bad_rule = WorkloadPolicy("w", "web", {}, ["172.17.0.2"], [], [Allow("r 1", DB_SET, [TCP5432])])
    cache = WorkloadPolicy(
        "w3", "cache", {}, ["172.17.0.4"], [Allow("r1", "ls_000000000000000c", [TCP5432])], []
    )
    instr = instructions(2, bad_rule, policy("db", inbound="web"), cache, web=("web",))
    bad_sets = {**instr.instructions.sets, "ls_000000000000000c": ["not-an-address"]}
    h.on(InstructionsAccepted(msgspec.structs.replace(instr.instructions, sets=bad_sets)))
    s = reconcile.step(h, {"web", "db", "cache"}, set())
    assert sorted(s.invalid) == ["cache", "web"]
    assert "r 1" in s.invalid["web"] and "not-an-address" in s.invalid["cache"]
    assert Run(h).steps() == [["apply db workload workload"], ["gate add db"]]
    assert isinstance(h.enforced["web"].table, IsolationTable) and not h.enforced["web"].gated


def test_a_workload_allowing_an_ip_block_is_enforced_not_isolated() -> None:
    """An `ip:` rule peer arrives as a set of CIDR blocks: renderable, not bad."""
    h = synced(seen("db"))
    db = WorkloadPolicy(
        "w2", "db", {}, ["172.17.0.3"], [Allow("r1", "ip_000000000000000a", [TCP5432])], []
    )
    instr = instructions(2, db)
    blocks = {**instr.instructions.sets, "ip_000000000000000a": ["203.0.113.0/24", "10.0.0.0/8"]}
    h.on(InstructionsAccepted(msgspec.structs.replace(instr.instructions, sets=blocks)))
    s = reconcile.step(h, {"db"}, set())
    assert s.invalid == {} and h.bad_sets == {}
    assert Run(h).steps() == [["apply db workload workload"], ["gate add db"]]


def test_in_place_once_its_table_and_gate_entry_are_there_even_with_sets_behind() -> None:
    h = synced(seen("web", started=True), seen("db", started=True))
    h.on(V1)
    run = Run(h)
    s = reconcile.step(h, {"web", "db"}, run.failed)
    assert [say(op) for op in s.ops] == ["apply db workload workload"]
    h.absorb(ok(s.ops[0]), run.failed)
    assert not reconcile.in_place(h, "db", run.failed)  # not admitted yet
    s = reconcile.step(h, {"web", "db"}, run.failed)
    h.absorb(ok(s.ops[0]), run.failed)  # gate add db
    assert say(s.ops[0]) == "gate add db" and reconcile.in_place(h, "db", run.failed)
    h.on(instructions(2, *V1.instructions.workloads, web=(), db=("db",)))
    assert reconcile.in_place(h, "db", run.failed)  # a set change to come: still in place
    assert not reconcile.in_place(h, "web", run.failed)  # its table is still to come


# ---- modes and visibility levels -----------------------------------------------------


def moded(pol: WorkloadPolicy, mode: Mode, level: VisibilityLevel = "blocked") -> WorkloadPolicy:
    return msgspec.structs.replace(pol, mode=mode, visibility=level)


def test_a_mode_switch_rewrites_the_table_in_place_and_keeps_the_gate_entry() -> None:
    h = synced(seen("web"), seen("db"), V1)
    web, db = V1.instructions.workloads
    h.on(instructions(2, web, moded(db, "visibility"), web=("web",), db=("db",)))
    assert Run(h).flat() == ["apply db workload workload"]
    table = h.enforced["db"].table
    assert isinstance(table, WorkloadTable) and table.structure.mode == "visibility"
    assert h.enforced["db"].gated == {("vethdb", "172.17.0.3")}
    h.on(instructions(3, web, moded(db, "full"), web=("web",), db=("db",)))
    assert Run(h).flat() == ["apply db workload workload"]  # back: blocked again


def test_a_level_change_rewrites_the_table() -> None:
    h = synced(seen("web"), seen("db"), V1)
    web, db = V1.instructions.workloads
    h.on(instructions(2, web, moded(db, "full", "enhanced"), web=("web",), db=("db",)))
    assert Run(h).flat() == ["apply db workload workload"]


def test_an_idle_workload_has_no_table_and_stays_admitted() -> None:
    h = synced(seen("web"), seen("db"), V1)
    web, db = V1.instructions.workloads
    h.on(instructions(2, web, moded(db, "idle"), web=("web",), db=("db",)))
    # admitted all along: only its table goes, and comes back
    assert Run(h).flat() == ["apply db exempt removal"]
    assert h.enforced["db"].gated == {("vethdb", "172.17.0.3")}
    h.on(instructions(3, web, db, web=("web",), db=("db",)))
    assert Run(h).flat() == ["apply db workload workload"]
    assert h.enforced["db"].gated == {("vethdb", "172.17.0.3")}


@pytest.mark.parametrize("mode", ["full", "visibility", "idle"])
def test_modes_relax_nothing_for_containers_that_are_not_paired(
    mode: Mode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused, an unkeyed and a keyed-but-unpaired container stay isolated and
    out of the gate whatever mode the paired workloads on the host are in."""
    monkeypatch.setitem(BOX, "other", (201, "172.17.0.11"))
    monkeypatch.setitem(BOX, "forged", (202, "172.17.0.12"))
    web, db = V1.instructions.workloads
    h = synced(seen("web"), seen("db"), instructions(1, moded(web, mode), moded(db, mode)))
    h.on(seen("cache", key="", started=True))
    h.on(seen("other", started=True))
    h.on(seen("forged", started=True))
    h.on(PairingRefused("forged", "invalid_key: bad signature"))
    Run(h).steps()
    for cid in ("cache", "other", "forged"):
        assert isinstance(h.enforced[cid].table, IsolationTable), cid
        assert h.enforced[cid].gated == frozenset(), cid


# ---- the mesh: another host's addresses are peers only while the kernel routes the pool ----

REMOTE_DB = "10.213.2.5"  # db's twin on another mesh host (an encrypted rule's peer)
BLOCKS = "ip_00000000000000aa"


def with_remote_peer(version: int) -> InstructionsAccepted:
    web = msgspec.structs.replace(
        policy("web", outbound="db"),
        outbound=[Allow("r1", DB_SET, [TCP5432]), Allow("r2", BLOCKS, [TCP5432])],
    )
    sets = {
        WEB_SET: [BOX["web"][1]],
        DB_SET: [BOX["db"][1], REMOTE_DB],
        BLOCKS: ["203.0.113.0/24"],
    }
    rules = [
        Rule("r1", [{"role": "db"}], [{"role": "web"}], ["tcp/5432"], options=["encrypted"]),
        Rule("r2", [], [{"role": "web"}], ["tcp/5432"], provider_ips=["203.0.113.0/24"]),
    ]
    instr = Instructions("h", version, [web, policy("db", inbound="web")], sets, rules)
    return InstructionsAccepted(instr)


def web_sets(h: Host) -> dict[str, list[str]]:
    table = h.enforced["web"].table
    assert isinstance(table, WorkloadTable)
    return dict(table.sets)


def test_another_hosts_address_is_no_peer_until_the_kernel_routes_the_pool() -> None:
    """Without the mesh in the kernel (never joined, turned off, not applied yet
    after a boot) a packet to another host's mesh address would take the default
    route in clear: the tables leave such addresses out. This host's own
    workloads, and address blocks, stay."""
    h = synced(seen("web", started=True), seen("db", started=True))
    h.on(with_remote_peer(1))
    Run(h).steps()
    assert web_sets(h) == {DB_SET: [BOX["db"][1]], BLOCKS: ["203.0.113.0/24"]}
    h.on(MeshState(True))  # the mesh is applied: the pool is routed through it
    Run(h).steps()
    assert web_sets(h) == {DB_SET: [BOX["db"][1], REMOTE_DB], BLOCKS: ["203.0.113.0/24"]}
    h.on(with_remote_peer(2))  # and stays so for newer instructions
    Run(h).steps()
    assert REMOTE_DB in web_sets(h)[DB_SET]


def test_a_paired_container_restarted_unseen_is_to_be_paired_again() -> None:
    """Its `die` was missed (Docker's event stream reconnecting after dockerd
    restarted it): it is unpaired and paired again, as after a live restart, so
    that its key is checked again; an unpaired container is simply seen again."""
    h = synced(seen("db", started=True), seen("web", started=True), instructions(1, policy("db")))
    assert h.take_restarted() == set()
    h.on(seen("db", pid=555))  # a new namespace, and no `gone` before it
    h.on(seen("web", pid=556))  # no workload: nothing to check again
    assert h.take_restarted() == {"db"}
    assert h.take_restarted() == set()
    # Known restarted: its new namespace is not read to find out again.
    assert "list db" not in Run(h).flat() and h.take_restarted() == set()
    h.on(ContainerGone("db"))  # a live restart: unpaired on `die` already
    h.on(seen("db", pid=557, started=True))
    assert h.take_restarted() == set()


def test_a_table_gone_as_soon_as_it_is_applied_is_reported_and_replaced_next_batch() -> None:
    """A container with CAP_NET_ADMIN that deletes `inet segd` as it is written:
    the read-back finds nothing. The table is reported, not admitted by the gate,
    and replaced whole at the next reconcile round (not in a loop within this batch)."""
    h = synced(seen("web", started=True), seen("db", started=True))
    h.on(V1)
    deleted = [0]

    def kernel(op: Op) -> Result:
        if isinstance(op, ApplyTable) and op.container == "web" and not deleted[0]:
            deleted[0] += 1
            return Done(op, listing=None)  # applied, then deleted before the read-back
        return ok(op)

    run = Run(h, kernel)
    lines = run.flat()
    assert [r.container for r in run.reports] == ["web"] and not run.reports[0].table_present
    assert sum(line.startswith("apply web") for line in lines) == 1  # not again in this batch
    rec = h.enforced["web"]
    assert rec.table is None and not rec.gated  # unknown: not admitted
    run.failed.clear()  # the next batch: the periodic round's full listing
    h.on(Listed())
    lines = run.flat()
    assert any(line.startswith("apply web") and "replace" in line for line in lines), lines
    assert isinstance(h.enforced["web"].table, WorkloadTable) and h.enforced["web"].gated
