"""The policy compiler: rules + workloads -> per-host management instructions.

Relevance follows the patent (¶0021): a host gets a rule only when one of its
workloads is a provider or a consumer of it, and gets the membership of only
the label sets those rules name on the *other* side. Each selector (label set)
becomes one named set, so a workload joining or leaving is a membership change.

The compiler is incremental: it keeps an index from selectors to matching
workloads and to the hosts those workloads live on, so adding or removing one
workload touches only the selectors it matches, and reports the hosts whose
instructions may have changed. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping

import msgspec

from segd import policy
from segd.policy import Labels, Service
from segd.wire import Allow, Instructions, Rule, Workload, WorkloadPolicy

_ENCODER = msgspec.json.Encoder(order="deterministic")


def encode_instructions(instr: Instructions) -> bytes:
    """Deterministic JSON bytes: same instructions, same bytes."""
    return _ENCODER.encode(instr)


def content_digest(instr: Instructions) -> str:
    """Digest of everything but the version, to tell a real change from a no-op."""
    return hashlib.sha256(_ENCODER.encode(msgspec.structs.replace(instr, version=0))).hexdigest()


class _CompiledRule(msgspec.Struct, frozen=True):
    rule: Rule
    providers: tuple[str, ...] | None  # selector set names; None = any
    consumers: tuple[str, ...] | None
    services: list[Service]


class Compiler:
    """In-memory incremental compiler. Feed it rules and workloads; ask for hosts."""

    def __init__(self, rules: Iterable[Rule] = (), workloads: Iterable[Workload] = ()) -> None:
        self._rules: dict[str, _CompiledRule] = {}
        self._selectors: dict[str, Labels] = {}  # set name -> selector labels
        self._prov_rules: dict[str, set[str]] = {}  # set name -> rules naming it as provider
        self._cons_rules: dict[str, set[str]] = {}  # set name -> rules naming it as consumer
        self._any_prov: set[str] = set()  # rules whose providers are "any"
        self._any_cons: set[str] = set()
        self._workloads: dict[str, Workload] = {}
        self._by_host: dict[str, set[str]] = {}
        self._members: dict[str, set[str]] = {}  # set name -> workload ids
        self._member_hosts: dict[str, Counter[str]] = {}  # set name -> host -> count
        self._matched: dict[str, set[str]] = {}  # workload id -> set names it matches
        self.set_rules(rules)
        for w in workloads:
            self.add_workload(w)

    # ---- inputs -----------------------------------------------------------------

    def set_rules(self, rules: Iterable[Rule]) -> set[str]:
        """Replace the rule set; every host with workloads may be affected."""
        self._rules.clear()
        self._selectors.clear()
        self._prov_rules.clear()
        self._cons_rules.clear()
        self._any_prov.clear()
        self._any_cons.clear()
        for r in rules:
            prov = self._index_side(r.id, r.providers, self._prov_rules, self._any_prov)
            cons = self._index_side(r.id, r.consumers, self._cons_rules, self._any_cons)
            self._rules[r.id] = _CompiledRule(r, prov, cons, policy.parse_services(r.services))
        self._members = {name: set() for name in self._selectors}
        self._member_hosts = {name: Counter() for name in self._selectors}
        for wid, w in self._workloads.items():
            self._matched[wid] = self._match(w.labels)
            for name in self._matched[wid]:
                self._members[name].add(wid)
                self._member_hosts[name][w.host_id] += 1
        return self.hosts()

    def _index_side(
        self,
        rule_id: str,
        side: policy.Selectors,
        index: dict[str, set[str]],
        any_rules: set[str],
    ) -> tuple[str, ...] | None:
        if side == "any":
            any_rules.add(rule_id)
            return None
        names = []
        for sel in side:
            name = policy.set_name(sel)
            self._selectors[name] = dict(sel)
            index.setdefault(name, set()).add(rule_id)
            names.append(name)
        return tuple(sorted(set(names)))

    def _match(self, labels: Mapping[str, str]) -> set[str]:
        return {n for n, sel in self._selectors.items() if policy.matches(labels, sel)}

    def add_workload(self, w: Workload) -> set[str]:
        """Add (or replace) a workload; return the hosts whose instructions may change."""
        affected: set[str] = set()
        if w.id in self._workloads:
            affected |= self.remove_workload(w.id)
        self._workloads[w.id] = w
        self._by_host.setdefault(w.host_id, set()).add(w.id)
        matched = self._match(w.labels)
        self._matched[w.id] = matched
        for name in matched:
            self._members[name].add(w.id)
            self._member_hosts[name][w.host_id] += 1
        return affected | self._affected_by(w.host_id, matched)

    def remove_workload(self, workload_id: str) -> set[str]:
        """Remove a workload; return the hosts whose instructions may change."""
        w = self._workloads.pop(workload_id, None)
        if w is None:
            return set()
        local = self._by_host.get(w.host_id)
        if local is not None:
            local.discard(workload_id)
            if not local:
                del self._by_host[w.host_id]
        matched = self._matched.pop(workload_id, set())
        for name in matched:
            self._members[name].discard(workload_id)
            counter = self._member_hosts[name]
            counter[w.host_id] -= 1
            if counter[w.host_id] <= 0:
                del counter[w.host_id]
        return self._affected_by(w.host_id, matched) | {w.host_id}

    def _affected_by(self, host_id: str, matched: set[str]) -> set[str]:
        """Hosts that hold a set whose membership changes when `matched` sets change."""
        out = {host_id}
        every_host = False
        for name in matched:
            # This set is a provider side: hosts of that rule's consumers hold it.
            for rid in self._prov_rules.get(name, ()):
                every_host |= self._hosts_of_side(self._rules[rid].consumers, out)
            for rid in self._cons_rules.get(name, ()):
                every_host |= self._hosts_of_side(self._rules[rid].providers, out)
            if every_host:
                return self.hosts() | {host_id}
        return out

    def _hosts_of_side(self, side: tuple[str, ...] | None, out: set[str]) -> bool:
        """Add the hosts of workloads on `side` to `out`; True when side is `any`."""
        if side is None:
            return True
        for name in side:
            out.update(self._member_hosts[name])
        return False

    # ---- outputs ----------------------------------------------------------------

    def hosts(self) -> set[str]:
        return set(self._by_host)

    def workloads_on(self, host_id: str) -> list[Workload]:
        return [self._workloads[w] for w in sorted(self._by_host.get(host_id, ()))]

    def compile_host(self, host_id: str, version: int) -> Instructions:
        """The management instructions of one host: its workloads' allows, the
        membership of the sets they reference, and the rules that are relevant."""
        policies: list[WorkloadPolicy] = []
        referenced: set[str] = set()
        relevant: set[str] = set()
        for w in self.workloads_on(host_id):
            matched = self._matched.get(w.id, set())
            as_prov = set(self._any_prov)
            as_cons = set(self._any_cons)
            for name in matched:
                as_prov |= self._prov_rules.get(name, set())
                as_cons |= self._cons_rules.get(name, set())
            inbound = self._allows(sorted(as_prov), provider_side=True, referenced=referenced)
            outbound = self._allows(sorted(as_cons), provider_side=False, referenced=referenced)
            relevant |= as_prov | as_cons
            policies.append(
                WorkloadPolicy(
                    workload_id=w.id,
                    container_id=w.container_id,
                    labels=w.labels,
                    ips=sorted(w.ips),
                    inbound=inbound,
                    outbound=outbound,
                )
            )
        sets = {
            name: sorted({ip for wid in self._members[name] for ip in self._workloads[wid].ips})
            for name in sorted(referenced)
        }
        rules = [self._rules[rid].rule for rid in sorted(relevant)]
        return Instructions(
            host_id=host_id, version=version, workloads=policies, sets=sets, rules=rules
        )

    def _allows(
        self, rule_ids: list[str], *, provider_side: bool, referenced: set[str]
    ) -> list[Allow]:
        out: list[Allow] = []
        for rid in rule_ids:
            cr = self._rules[rid]
            peers = cr.consumers if provider_side else cr.providers
            if peers is None:
                out.append(Allow(rule_id=rid, peer=None, services=cr.services))
                continue
            for name in peers:
                referenced.add(name)
                out.append(Allow(rule_id=rid, peer=name, services=cr.services))
        return out

    def compile_all(self, versions: Mapping[str, int] | None = None) -> dict[str, Instructions]:
        versions = versions or {}
        return {h: self.compile_host(h, versions.get(h, 0)) for h in sorted(self.hosts())}
