"""What the agent knows about its host, updated by events and by kernel results (pure).

`Host` holds Docker's view (containers, the identity of their namespaces, who
owns which namespace), the server's (the last accepted instructions, pairings
answered or refused) and the kernel's as far as the agent made it (`Enforced`
per container, the gate). `on(event)` folds one `HostEvent` in; `absorb(result)`
one kernel result. Both mark the containers whose state may need kernel work
(`dirty`); `segd.agent.reconcile` decides that work. No I/O, no awaits: tests
drive it with tables of events.

Invariant: `enforced` holds a record for exactly the containers that own their
namespace (`sharing`). A record whose container is gone, stops owning its
namespace or restarts in a new one is retired: its gate entries go to
`ungate` and its namespace to `unbind` until the kernel has dropped them.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from segd.agent import sharing
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
from segd.agent.ops import (
    ApplyTable,
    Done,
    Failed,
    Forget,
    GateChange,
    GateRebuild,
    GateSubnets,
    Kind,
    ListGate,
    ListTable,
    LookupPorts,
    NoTable,
    Ns,
    Result,
    TableState,
    container_of,
)
from segd.agent.sharing import NsId, Role
from segd.firewall.gate import GateEntry
from segd.firewall.render import check_set, is_blocks, log_rules
from segd.wire import Instructions, SidecarIn, WorkloadPolicy

GateMode = Literal["initial", "ok", "rebuild"]
"""`initial`: not built since the agent started (built whole once every container
has its table); `rebuild`: a change failed or it was found missing."""


class Enforced(msgspec.Struct):
    """What the agent made of one container's namespace (and the gate)."""

    ns: Ns
    kind: Kind | None = None  # reached by the last successful apply; None: not yet, or failed
    table: TableState | None = None  # what its table holds; None: unknown
    listing: str | None = None  # `list table` right after our last change
    ports: dict[str, str] | None = None  # ip -> host bridge port, once looked up
    gated: frozenset[GateEntry] = frozenset()  # entries the gate admits for it


class RoleChange(msgspec.Struct, frozen=True):
    """A container's namespace role changed (`old` None: first seen)."""

    info: ContainerInfo
    old: Role | None
    new: Role


class Report(msgspec.Struct, frozen=True):
    """Tampering found by a kernel result: logged and sent to the server."""

    container: str  # "" for the gate
    detail: str
    table_present: bool = True


class Awaiting(msgspec.Struct, frozen=True):
    version: int
    ips: list[str]


@dataclass
class Host:
    isolate_unkeyed: bool
    host_ns: frozenset[NsId] = frozenset()
    containers: dict[str, ContainerInfo] = field(default_factory=dict)
    nsids: dict[str, NsId | None] = field(default_factory=dict)
    roles: dict[str, Role] = field(default_factory=dict)
    fresh: dict[str, int] = field(default_factory=dict)  # cid -> pid whose namespace is clean
    instr: Instructions | None = None
    workloads: dict[str, WorkloadPolicy] = field(default_factory=dict)
    # The kernel routes the mesh pool (`MeshState`). Until it does, a set of
    # workload addresses holds only this host's own workloads' (`peer_sets`):
    # another host's address is a mesh address, whose traffic would leave in clear.
    mesh_up: bool = False
    peer_sets: Mapping[str, list[str]] = field(default_factory=dict)
    logged: frozenset[str] = frozenset()  # rules whose accepts are logged
    bad_sets: dict[str, str] = field(default_factory=dict)  # set -> why it cannot be rendered
    denied: dict[str, str] = field(default_factory=dict)
    awaiting: dict[str, Awaiting] = field(default_factory=dict)  # paired, instructions to come
    subnets: tuple[str, ...] = ()
    listed: bool = False  # Docker's full list has been seen once
    enforced: dict[str, Enforced] = field(default_factory=dict)
    ungate: set[GateEntry] = field(default_factory=set)  # retired entries still admitted
    unbind: dict[Ns, None] = field(default_factory=dict)  # retired namespaces to forget
    gate: GateMode = "initial"
    gate_reason: str = ""  # the failure that put the gate in `rebuild`
    gate_subnets: tuple[str, ...] | None = None  # what the gate guards
    dirty: set[str] = field(default_factory=set)
    revision: int = 0  # counts events: a plan made before a newer one may be stale
    seen_at: dict[str, int] = field(default_factory=dict)  # cid -> revision last seen
    gone_at: dict[str, int] = field(default_factory=dict)  # cid -> revision it went
    # Paired containers seen in a new namespace with no `gone` before (the agent
    # missed their `die`: Docker's event stream reconnecting after dockerd
    # restarted them): to be unpaired and paired again, as after a live restart,
    # so that their key is checked again.
    restarted: set[str] = field(default_factory=set)
    # Paired containers in a namespace the agent did not see being made (after
    # the agent itself started, or Docker's stream was down): its table is read
    # first. None there means a new namespace, so a restart the agent missed
    # (a reboot, or while it was stopped): the container goes to `restarted`.
    unverified: set[str] = field(default_factory=set)

    @property
    def version(self) -> int:
        return self.instr.version if self.instr is not None else 0

    # ---- events ----------------------------------------------------------------------

    def on(self, ev: HostEvent) -> list[RoleChange]:
        """Fold one event in; the namespace roles it changed (to log)."""
        self.revision += 1
        match ev:
            case ContainerSeen(info, ns, started):
                return self._seen(info, ns, started)
            case ContainerGone(cid):
                return self._gone(cid)
            case Listed():
                self.listed = True
                self.dirty |= self.enforced.keys()  # look at every container again
            case SubnetsSeen(subnets):
                self.subnets = subnets
            case MeshState(up):
                self._mesh(up)
            case InstructionsAccepted(instr):
                self._accept(instr)
            case Paired(cid, version, ips):
                self.denied.pop(cid, None)
                if version > self.version:
                    self.awaiting[cid] = Awaiting(version, ips)
            case PairingRefused(cid, reason):
                self.denied[cid] = reason
        return []

    def _seen(self, info: ContainerInfo, ns: NsId | None, started: bool) -> list[RoleChange]:
        cid = info.id
        old = self.containers.get(cid)
        if old is not None and old.pid != info.pid:
            self._retire(cid)  # restarted: a new namespace
            if cid in self.workloads:
                self.restarted.add(cid)
        elif old is not None and old.ips != info.ips and cid in self.enforced:
            self.enforced[cid].ports = None  # attached or detached: look the ports up again
        if started and (old is None or old.pid != info.pid):
            self.fresh[cid] = info.pid
        self.containers[cid] = info
        self.nsids[cid] = ns
        self.seen_at[cid] = self.revision
        self.dirty.add(cid)
        return self._reassign()

    def _gone(self, cid: str) -> list[RoleChange]:
        self.gone_at[cid] = self.revision
        self.seen_at.pop(cid, None)
        self.denied.pop(cid, None)
        self.awaiting.pop(cid, None)
        self.fresh.pop(cid, None)
        self.nsids.pop(cid, None)
        self.restarted.discard(cid)
        self.unverified.discard(cid)
        if self.containers.pop(cid, None) is None:
            return []
        return self._reassign()

    def _accept(self, instr: Instructions) -> None:
        old, self.instr = self.instr, instr
        self.workloads = {w.container_id: w for w in instr.workloads}
        self.logged = log_rules(instr.rules)
        before = old.sets if old is not None else {}
        self.bad_sets = {n: why for n, why in self.bad_sets.items() if n in instr.sets}
        for name, addrs in instr.sets.items():
            if before.get(name) != addrs:  # only what changed is checked again
                try:
                    check_set(name, addrs)  # addresses, or CIDR blocks in an ip_ set
                    self.bad_sets.pop(name, None)
                except ValueError as e:
                    self.bad_sets[name] = str(e)
        for cid, aw in list(self.awaiting.items()):
            if instr.version >= aw.version:
                del self.awaiting[cid]
        self._peer_sets()
        self.dirty |= affected(old, instr) & self.containers.keys()

    def _mesh(self, up: bool) -> None:
        if up != self.mesh_up:
            self.mesh_up = up
            self._peer_sets()
            self.dirty |= self.enforced.keys()

    def _peer_sets(self) -> None:
        """The instructions' sets as this host's tables may use them now."""
        instr = self.instr
        if instr is None or self.mesh_up:
            self.peer_sets = instr.sets if instr is not None else {}
            return
        own = {ip for w in instr.workloads for ip in w.ips}
        self.peer_sets = {
            name: addrs if is_blocks(name) else [a for a in addrs if a in own]
            for name, addrs in instr.sets.items()
        }

    def _reassign(self) -> list[RoleChange]:
        """Decide again which container owns which namespace (`sharing.assign`);
        records follow ownership."""
        seen = [
            sharing.Seen(id=cid, joins=c.joins, host_mode=c.host_network, ns=self.nsids.get(cid))
            for cid, c in self.containers.items()
        ]
        roles = sharing.assign(seen, self.host_ns)
        changes = [
            RoleChange(self.containers[cid], self.roles.get(cid), role)
            for cid, role in roles.items()
            if role != self.roles.get(cid)
        ]
        self.roles = roles
        for cid in list(self.enforced):
            if roles.get(cid, sharing.UNKNOWN).kind != "owner":
                self._retire(cid)
        for cid, role in roles.items():
            if role.kind == "owner" and cid not in self.enforced:
                info = self.containers[cid]
                clean = self.fresh.get(cid) == info.pid
                ns = Ns(key=cid, path=info.netns_path)
                self.enforced[cid] = Enforced(ns=ns, table=NoTable() if clean else None)
                pol = self.workloads.get(cid)
                # A restart already known needs no read; idle has no table to read.
                known = cid in self.restarted
                if not clean and not known and pol is not None and pol.mode != "idle":
                    self.unverified.add(cid)
                self.dirty.add(cid)
        return changes

    def _retire(self, cid: str) -> None:
        self.unverified.discard(cid)
        rec = self.enforced.pop(cid, None)
        if rec is not None:
            self.ungate |= rec.gated
            self.unbind[rec.ns] = None

    # ---- kernel results --------------------------------------------------------------

    def absorb(self, res: Result, failed: set[str]) -> list[Report]:
        """Fold one kernel result in. Containers whose work failed go to `failed`
        (not tried again until their next batch); `"gate"` there stops gate work."""
        op = res.op
        if isinstance(op, (GateChange, GateRebuild, GateSubnets, ListGate)):
            return self._absorb_gate(res, op, failed)
        rec = self.enforced.get(container_of(op))
        if isinstance(op, (ApplyTable, LookupPorts, ListTable)) and rec and op.ns != rec.ns:
            rec = None  # the container restarted while this ran: the result is stale
        match res, op:
            case Done(listing=None), ApplyTable(listed=True) if rec is not None:
                return self._gone_at_once(op, rec, failed)
            case _, ApplyTable():
                self._table_applied(res, op, rec, failed)
            case Done(ports=ports), LookupPorts():
                if rec is not None:
                    rec.ports = ports
            case Failed(), LookupPorts(container=cid):
                failed.add(cid)
            case _, Forget(ns=ns):
                self.unbind.pop(ns, None)
            case _, ListTable():
                return self._table_read(res, op, rec)
        return []

    def _table_read(self, res: Result, op: ListTable, rec: Enforced | None) -> list[Report]:
        if op.container in self.unverified:
            self._verified(op.container, rec, res)
            return []
        if isinstance(res, Done):
            return self._table_listed(op.container, rec, res.listing)
        return []

    @staticmethod
    def _table_applied(res: Result, op: ApplyTable, rec: Enforced | None, failed: set[str]) -> None:
        match res:
            case Done(listing=listing):
                if rec is not None:
                    rec.kind, rec.table, rec.listing = op.kind, op.table, listing
            case Failed(gone=False) if op.refused == "unknown":
                if rec is not None:
                    rec.table, rec.listing = None, None
            case Failed():
                failed.add(op.container)
                if rec is not None:
                    rec.kind, rec.table, rec.listing = None, None, None

    def _verified(self, cid: str, rec: Enforced | None, res: Result) -> None:
        """The table of a paired container's namespace not seen being made, read:
        none there is a restart the agent missed. (A read that failed tells
        nothing: the container stays as it was.)"""
        self.unverified.discard(cid)
        self.dirty.add(cid)
        gone = rec is not None and isinstance(res, Done) and res.listing is None
        if gone and cid in self.workloads:
            self.restarted.add(cid)

    def _gone_at_once(self, op: ApplyTable, rec: Enforced, failed: set[str]) -> list[Report]:
        """The table was applied, then gone when read back: removed from inside the
        namespace at once. Reported, and replaced whole at the next reconcile
        round (not in this batch: a container doing it in a loop cannot keep the
        agent busy)."""
        rec.kind, rec.table, rec.listing = op.kind, None, None
        failed.add(op.container)
        return [Report(op.container, "namespace table removed as it was applied", False)]

    def _table_listed(self, cid: str, rec: Enforced | None, listing: str | None) -> list[Report]:
        """A table read back: one changed behind segd's back is replaced whole."""
        if rec is None or rec.table is None or listing == rec.listing:
            return []
        rec.table, rec.listing = None, None  # replaced whole, not patched
        self.dirty.add(cid)
        return [
            Report(
                cid,
                "namespace table changed outside segd; repaired",
                table_present=listing is not None,
            )
        ]

    def _absorb_gate(
        self,
        res: Result,
        op: GateChange | GateRebuild | GateSubnets | ListGate,
        failed: set[str],
    ) -> list[Report]:
        match res, op:
            case _, GateChange(what=what, entries=entries):
                self._gate_changed(what, entries)
                if isinstance(res, Failed):
                    self.gate, self.gate_reason = "rebuild", res.error
            case _, GateRebuild():
                return self._gate_rebuilt(res, op, failed)
            case Done(), GateSubnets(subnets=subnets):
                self.gate_subnets = subnets
            case Failed(error=error), GateSubnets():
                self.gate, self.gate_reason = "rebuild", error
            case Done(listing=None), ListGate():
                if self.gate != "initial":
                    self.gate = "rebuild"
                return [Report("", "host gate table missing; rebuilt", table_present=False)]
        return []

    def _gate_rebuilt(self, res: Result, op: GateRebuild, failed: set[str]) -> list[Report]:
        for rec in self.enforced.values():
            rec.gated = op.entries.get(rec.ns, frozenset())
        if isinstance(res, Failed):
            failed.add("gate")
            return []
        # Exactly `entries` is admitted now; those of records retired meanwhile go.
        self.ungate = {e for ns, es in op.entries.items() if not self._record(ns) for e in es}
        self.gate, self.gate_reason, self.gate_subnets = "ok", "", op.subnets
        if op.reason:
            return [Report("", f"host gate changed outside segd: {op.reason}")]
        return []

    def _gate_changed(self, what: str, entries: Mapping[Ns, frozenset[GateEntry]]) -> None:
        """Entries added to or removed from the gate (or tried: a failure rebuilds it)."""
        for ns, these in entries.items():
            owner = self._record(ns)
            if what == "remove":
                self.ungate -= these
                if owner is not None:
                    owner.gated -= these
            elif owner is not None:
                owner.gated |= these
            else:  # retired while this ran: to be removed again
                self.ungate |= these

    def _record(self, ns: Ns) -> Enforced | None:
        """The record of the container incarnation `ns` (None once retired)."""
        rec = self.enforced.get(ns.key)
        return rec if rec is not None and rec.ns == ns else None

    # ---- a full listing of Docker --------------------------------------------------------

    def listing(
        self, running: Mapping[str, ContainerInfo], since: int
    ) -> tuple[list[str], list[ContainerInfo]]:
        """Read a full listing of the running containers, begun at revision `since`,
        against the events folded in meanwhile: (the containers it shows gone, the
        containers to see again). A container seen since the listing began is not
        gone (it started meanwhile); one gone since is not seen again (it died
        meanwhile). Forgets the departures the listing no longer needs."""
        gone = [c for c in self.containers if c not in running and self.seen_at[c] <= since]
        seen = [info for c, info in running.items() if self.gone_at.get(c, -1) <= since]
        self.gone_at = {c: r for c, r in self.gone_at.items() if r > since}
        return gone, seen

    # ---- questions the agent asks --------------------------------------------------------

    def take_restarted(self) -> set[str]:
        """The paired containers that restarted unseen since the last call."""
        restarted, self.restarted = self.restarted, set()
        return restarted

    def take_dirty(self) -> set[str]:
        """The containers marked since the last call (those still running)."""
        dirty, self.dirty = self.dirty, set()
        return dirty & self.enforced.keys()

    def owner(self, cid: str) -> bool:
        return self.roles.get(cid, sharing.UNKNOWN).kind == "owner"

    def needs_pairing(self, cid: str, in_flight: Container[str]) -> bool:
        """A keyed container that owns its namespace and has no workload for its
        current addresses, no refusal, and no pairing under way or answered."""
        info = self.containers.get(cid)
        if info is None or not info.pairing_key or not self.owner(cid):
            return False
        pol = self.workloads.get(cid)
        if pol is not None and pol.ips == info.ips:
            return False
        if cid in self.denied or cid in in_flight:
            return False
        aw = self.awaiting.get(cid)
        return aw is None or aw.ips != info.ips

    def stale_workloads(self, in_flight: Container[str]) -> list[str]:
        """Workloads of this host that should be unpaired: their container is no
        longer running here, or is in a namespace it does not own."""

        def stale(cid: str) -> bool:
            if cid not in self.containers:
                return cid not in in_flight
            return self.roles.get(cid, sharing.UNKNOWN).kind in ("shares", "host")

        return [cid for cid in self.workloads if stale(cid)]

    def sidecars(self) -> list[SidecarIn]:
        """Every running container in another's namespace, with that container."""
        return [
            SidecarIn(container_id=cid, shares=role.owner, name=self.containers[cid].name)
            for cid, role in sorted(self.roles.items())
            if role.kind == "shares" and role.owner and cid in self.containers
        ]


def affected(old: Instructions | None, new: Instructions) -> set[str]:
    """Containers whose table or gate entries may differ between two instructions:
    their policy's allows, mode, visibility level or addresses changed, a set it
    refers to changed, or the logging of one of its rules."""
    new_w = {w.container_id: w for w in new.workloads}
    if old is None:
        return set(new_w)
    old_w = {w.container_id: w for w in old.workloads}
    sets = {n for n in old.sets.keys() | new.sets.keys() if old.sets.get(n) != new.sets.get(n)}
    logs = log_rules(old.rules) ^ log_rules(new.rules)
    out: set[str] = set()
    for cid in old_w.keys() | new_w.keys():
        a, b = old_w.get(cid), new_w.get(cid)
        if a is None or b is None or a.inbound != b.inbound or a.outbound != b.outbound:
            out.add(cid)
            continue
        if a.mode != b.mode or a.visibility != b.visibility or a.ips != b.ips:
            out.add(cid)
            continue
        allows = [*b.inbound, *b.outbound]
        if {x.peer for x in allows if x.peer} & sets or {x.rule_id for x in allows} & logs:
            out.add(cid)
    return out
