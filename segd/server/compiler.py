"""The policy compiler: rules + workloads -> per-host management instructions.

Relevance follows the patent (¶0021): a host gets a rule only when one of its
workloads is a provider or a consumer of it, and gets the membership of only
the label sets those rules name on the *other* side. Each selector (label set)
becomes one named set, so a workload joining or leaving is a membership change.

The compiler is incremental: it keeps an index from selectors to matching
workloads and to the hosts those workloads live on, so adding or removing one
workload touches only the selectors it matches, and reports the hosts whose
instructions may have changed. Everything a host's instructions are made of is
cached and shared: the allows of each combination of matched selectors, each
workload's policy, each host's workloads and rules, and each set's sorted
addresses (replaced, never mutated, when a member joins or leaves), and the
JSON of the sets and of the parts already encoded. Compiling a host assembles
those parts; `host_digest` hashes the digests of the parts, so telling whether a
host changed does not re-encode its instructions, and `encode` re-encodes only
the parts that changed. The digests of a set's addresses and of a host's
workloads are `BucketDigest`s, which a member joining or leaving updates in
a small part of their size: a commit costs what it changed, not the fleet's size.

Address scopes (`segd.server.mesh`): an address inside the mesh pool is a mesh
address, every other one is host-local. A set on host H holds the mesh
addresses of every member and the host-local addresses of H's own members
only: another host's host-local address means nothing on H (Docker's default
bridges overlap across hosts). A set is shared by every host with no
host-local member of it; a host with one has its own copy (`name@host`). A
workload with no mesh address changes its own host's instructions only.

The mesh part of a mesh host's instructions names the other mesh hosts with
workloads (with mesh addresses) in the sets it references, or every other
mesh host when one of its workloads allows any address; the relation is
symmetric, so both ends of a rule have each other as peers.

A rule side may also name address blocks (`ip:` peers): one constant set of
CIDRs per side (`policy.ip_set_name`), held like any other set.

Pure: no I/O.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import sys
from collections import Counter
from collections.abc import Iterable, Mapping

import msgspec

from segd import policy
from segd.policy import Labels, Service
from segd.server.buckets import BucketDigest
from segd.server.mesh import matcher as mesh_matcher
from segd.wire import Allow, Instructions, Mesh, MeshPeer, Rule, Workload, WorkloadPolicy

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


class _Profile(msgspec.Struct, frozen=True):
    """What every workload matching exactly the same selectors shares."""

    inbound: list[Allow]
    outbound: list[Allow]
    referenced: frozenset[str]  # sets its allows name as peers
    relevant: frozenset[str]  # rule ids
    any_peer: bool  # an allow of any address


class _Policy(msgspec.Struct, frozen=True):
    """A workload's policy and the digest of its JSON."""

    policy: WorkloadPolicy
    digest: bytes


class _HostRows:
    """A host's workloads in id order, with their policies, digests and (once the
    host was encoded) JSON, kept up to date as workloads come and go: a host's
    part is rebuilt, and encoded, by copies."""

    __slots__ = ("digest", "jsons", "matched", "pending", "policies", "wids")

    def __init__(self) -> None:
        self.wids: list[str] = []
        self.policies: list[WorkloadPolicy] = []
        self.digest = BucketDigest(b"rows")  # workload id -> its policy's digest
        self.jsons: list[bytes] = []  # b"" until first needed
        self.pending: set[str] = set()  # workloads whose JSON is not made yet
        self.matched: Counter[frozenset[str]] = Counter()  # selector combinations present

    def insert(self, pol: _Policy, matched: frozenset[str]) -> None:
        wid = pol.policy.workload_id
        i = bisect.bisect_left(self.wids, wid)
        self.wids.insert(i, wid)
        self.policies.insert(i, pol.policy)
        self.digest.put(wid, pol.digest)
        self.jsons.insert(i, b"")
        self.pending.add(wid)
        self.matched[matched] += 1

    def encode(self) -> bytes:
        """The policies' JSON, comma-separated, encoding only those not done yet."""
        for wid in self.pending:
            i = bisect.bisect_left(self.wids, wid)
            self.jsons[i] = _ENCODER.encode(self.policies[i])
        self.pending.clear()
        return b",".join(self.jsons)

    def remove(self, wid: str, matched: frozenset[str]) -> None:
        i = bisect.bisect_left(self.wids, wid)
        if i < len(self.wids) and self.wids[i] == wid:
            for column in (self.wids, self.policies, self.jsons):
                del column[i]
            self.digest.discard(wid)
            self.pending.discard(wid)
            self.matched[matched] -= 1
            if self.matched[matched] <= 0:
                del self.matched[matched]


class _HostPart(msgspec.Struct, frozen=True):
    """A host's instructions without the set contents, and their digest."""

    workloads: list[WorkloadPolicy]
    refs: tuple[str, ...]  # sorted names of the sets it references
    rules: list[Rule]
    digest: bytes  # of the host id, its workloads' policies and its rules
    any_peer: bool  # a workload allows any address


class _HostView:
    """A host's compiled parts. `sets` is replaced, never edited: a set the host
    holds that changed is noted in `stale` and swapped in by the next compile;
    `set_digests` (in `refs` order) likewise through `stale_digests`, which
    starts with every set: digests are made when first asked for, so compiling
    does not make them. The JSON of the part's workloads and rules is made when
    first encoded, then kept."""

    __slots__ = (
        "digest",
        "keys",
        "mesh",
        "part",
        "positions",
        "rules_json",
        "set_digests",
        "sets",
        "stale",
        "stale_digests",
        "workloads_json",
    )

    def __init__(
        self,
        part: _HostPart,
        keys: dict[str, str],
        sets: dict[str, list[str]],
    ) -> None:
        self.part = part
        self.keys = keys  # set name -> the key of the copy the host holds
        self.sets = sets
        self.set_digests = [b""] * len(part.refs)
        self.positions = {name: i for i, name in enumerate(part.refs)}
        self.stale: set[str] = set()
        self.stale_digests: set[str] = set(part.refs)
        self.digest = ""
        self.workloads_json = b""
        self.rules_json = b""
        self.mesh: tuple[Mesh | None, bytes] | None = None  # and its digest; None: not made


class Compiler:
    """In-memory incremental compiler. Feed it rules and workloads; ask for hosts."""

    def __init__(
        self,
        rules: Iterable[Rule] = (),
        workloads: Iterable[Workload] = (),
        *,
        pool: str = "",
        mesh: Iterable[MeshPeer] = (),
    ) -> None:
        self._pool = pool
        self._is_mesh = mesh_matcher(pool)
        self._mesh: dict[str, MeshPeer] = {p.host_id: p for p in mesh}  # joined, not revoked
        self._rules: dict[str, _CompiledRule] = {}
        self._selectors: dict[str, Labels] = {}  # set name -> selector labels
        self._by_items: dict[frozenset[tuple[str, str]], str] = {}  # selector labels -> name
        self._longest = 0  # labels in the longest selector
        self._prov_rules: dict[str, set[str]] = {}  # set name -> rules naming it as provider
        self._cons_rules: dict[str, set[str]] = {}  # set name -> rules naming it as consumer
        self._any_prov: set[str] = set()  # rules whose providers are "any"
        self._any_cons: set[str] = set()
        self._workloads: dict[str, Workload] = {}
        self._by_host: dict[str, set[str]] = {}
        self._scoped: dict[str, tuple[list[str], list[str]]] = {}  # id -> (mesh, local) ips
        # (scope, address) -> workload ids holding it; scope "" (mesh) or a host id
        self._ip_owners: dict[tuple[str, str], set[str]] = {}
        self._members: dict[str, set[str]] = {}  # set name -> workload ids
        self._member_hosts: dict[str, Counter[str]] = {}  # set name -> host -> count
        # set name -> host -> members with a mesh address / with a host-local address
        self._mesh_hosts: dict[str, Counter[str]] = {}
        self._local_hosts: dict[str, Counter[str]] = {}
        self._ip_sets: dict[str, list[str]] = {}  # ip set name -> its blocks
        self._matched: dict[str, frozenset[str]] = {}  # workload id -> set names it matches
        # Derived parts, rebuilt on demand.
        self._profiles: dict[frozenset[str], _Profile] = {}
        self._policies: dict[str, _Policy] = {}
        self._rule_digests: dict[str, bytes] = {}
        self._rows: dict[str, _HostRows] = {}
        self._views: dict[str, _HostView] = {}
        # Sets by key: the set name for the copy shared by hosts with no host-local
        # member, `name@host` for a host's own copy.
        self._holders: dict[str, set[str]] = {}  # set key -> hosts whose views hold it
        self._copies: dict[str, set[str]] = {}  # set name -> hosts with a copy built
        self._set_ips: dict[str, list[str]] = {}  # set key -> sorted addresses (never mutated)
        # set key -> (address, joined) edits not made to its list yet: a list is made
        # again when it is read, not at every member's change
        self._set_edits: dict[str, list[tuple[str, bool]]] = {}
        self._set_jsons: dict[str, bytes] = {}  # set key -> its addresses' JSON
        self._set_hashes: dict[str, BucketDigest] = {}  # set key -> its content's digest
        self._previous_set_json: dict[str, tuple[list[str], bytes]] = {}  # the list before
        self.set_rules(rules)
        for w in workloads:
            self.add_workload(w)

    # ---- inputs -----------------------------------------------------------------

    def set_rules(self, rules: Iterable[Rule]) -> set[str]:
        """Replace the rule set; every host with workloads may be affected."""
        self._rules.clear()
        self._rule_digests.clear()
        self._selectors.clear()
        self._by_items.clear()
        self._prov_rules.clear()
        self._cons_rules.clear()
        self._any_prov.clear()
        self._any_cons.clear()
        self._ip_sets.clear()
        for r in rules:
            prov = self._index_side(
                r.id, r.providers, r.provider_ips, self._prov_rules, self._any_prov
            )
            cons = self._index_side(
                r.id, r.consumers, r.consumer_ips, self._cons_rules, self._any_cons
            )
            self._rules[r.id] = _CompiledRule(r, prov, cons, policy.parse_services(r.services))
            self._rule_digests[r.id] = _digest(b"rule", r)
        self._longest = max((len(s) for s in self._selectors.values()), default=0)
        self._profiles.clear()
        self._policies.clear()
        self._rows.clear()
        self._views.clear()
        self._holders.clear()
        self._copies.clear()
        self._set_ips.clear()
        self._set_edits.clear()
        self._set_jsons.clear()
        self._set_hashes.clear()
        self._previous_set_json.clear()
        self._members = {name: set() for name in self._selectors}
        self._member_hosts = {name: Counter() for name in self._selectors}
        self._mesh_hosts = {name: Counter() for name in self._selectors}
        self._local_hosts = {name: Counter() for name in self._selectors}
        for wid, w in self._workloads.items():
            self._matched[wid] = self._match(w.labels)
            for name in self._matched[wid]:
                self._join(name, w)
        return self.hosts() | set(self._mesh)

    def _index_side(
        self,
        rule_id: str,
        side: policy.Selectors,
        blocks: list[str],
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
            self._by_items[frozenset(sel.items())] = name
            index.setdefault(name, set()).add(rule_id)
            names.append(name)
        if blocks:
            name = policy.ip_set_name(blocks)
            self._ip_sets[name] = policy.sorted_blocks(blocks)
            names.append(name)
        return tuple(sorted(set(names)))

    def _match(self, labels: Mapping[str, str]) -> frozenset[str]:
        """The selectors `labels` match: look up each subset of the labels no longer
        than the longest selector, or test every selector when that is cheaper."""
        items = sorted(labels.items())
        longest = min(self._longest, len(items))
        subsets = sum(math.comb(len(items), k) for k in range(longest + 1))
        if subsets > len(self._selectors):
            return frozenset(n for n, sel in self._selectors.items() if policy.matches(labels, sel))
        out = []
        for k in range(longest + 1):
            for combo in itertools.combinations(items, k):
                name = self._by_items.get(frozenset(combo))
                if name is not None:
                    out.append(name)
        return frozenset(out)

    def add_workload(self, w: Workload) -> set[str]:
        """Add (or replace) a workload; return the hosts whose instructions may change."""
        affected: set[str] = set()
        if w.id in self._workloads:
            affected |= self.remove_workload(w.id)
        self._workloads[w.id] = w
        self._by_host.setdefault(w.host_id, set()).add(w.id)
        mesh_ips, local_ips = self._scoped[w.id] = self._split(w.ips)
        for ip in mesh_ips:
            self._ip_owners.setdefault(("", ip), set()).add(w.id)
        for ip in local_ips:
            self._ip_owners.setdefault((w.host_id, ip), set()).add(w.id)
        matched = self._match(w.labels)
        self._matched[w.id] = matched
        for name in matched:
            self._join(name, w)
            self._member_changed(name, w, joined=True)
        rows = self._rows.get(w.host_id)
        if rows is not None:
            rows.insert(self._policy(w.id), matched)
        self._rows_changed(w.host_id)
        if not mesh_ips:  # host-local addresses only: no other host sees it
            return affected | {w.host_id}
        return affected | self._affected_by(w.host_id, matched)

    def _split(self, ips: Iterable[str]) -> tuple[list[str], list[str]]:
        """(mesh addresses, host-local addresses)."""
        mesh: list[str] = []
        local: list[str] = []
        for ip in ips:
            (mesh if self._is_mesh(ip) else local).append(ip)
        return mesh, local

    def _join(self, name: str, w: Workload) -> None:
        """Count `w` (now in `_workloads`) as a member of the set `name`."""
        self._members[name].add(w.id)
        self._member_hosts[name][w.host_id] += 1
        mesh_ips, local_ips = self._scoped[w.id]
        if mesh_ips:
            self._mesh_hosts[name][w.host_id] += 1
            if self._mesh_hosts[name][w.host_id] == 1:
                self._peers_changed(name)
        if local_ips:
            self._local_hosts[name][w.host_id] += 1

    def _leave(self, name: str, w: Workload) -> None:
        """Count `w` out of the set `name` (its members no longer have it)."""
        _decrement(self._member_hosts[name], w.host_id)
        mesh_ips, local_ips = self._scoped[w.id]
        if mesh_ips and _decrement(self._mesh_hosts[name], w.host_id):
            self._peers_changed(name)
        if local_ips and _decrement(self._local_hosts[name], w.host_id):
            # The host's own copy goes (its view is dropped with this change).
            key = f"{name}@{w.host_id}"
            self._set_ips.pop(key, None)
            self._set_edits.pop(key, None)
            self._set_jsons.pop(key, None)
            self._set_hashes.pop(key, None)
            self._previous_set_json.pop(key, None)
            copies = self._copies.get(name)
            if copies is not None:
                copies.discard(w.host_id)

    def _peers_changed(self, name: str) -> None:
        """A host gained its first or lost its last mesh member of `name`: the mesh
        peers of the hosts holding the set may change."""
        if not self._mesh:
            return
        for key in (name, *(f"{name}@{h}" for h in self._copies.get(name, ()))):
            for h in self._holders.get(key, ()):
                view = self._views[h]
                view.mesh = None
                view.digest = ""

    def set_mode(self, w: Workload) -> set[str]:
        """The workload `w.id` with `w`'s mode and visibility: only its own policy
        changes, so only its host is affected."""
        old = self._workloads.get(w.id)
        if old is None:
            return set()
        self._workloads[w.id] = msgspec.structs.replace(
            old, mode=w.mode, mode_override=w.mode_override, visibility=w.visibility
        )
        if (old.mode, old.visibility) == (w.mode, w.visibility):
            return set()
        self._policies.pop(w.id, None)
        rows = self._rows.get(old.host_id)
        if rows is not None:
            matched = self._matched[w.id]
            rows.remove(w.id, matched)
            rows.insert(self._policy(w.id), matched)
        self._rows_changed(old.host_id)
        return {old.host_id}

    def workload(self, workload_id: str) -> Workload | None:
        return self._workloads.get(workload_id)

    def workloads(self) -> list[Workload]:
        """Every workload, in id order."""
        return [self._workloads[k] for k in sorted(self._workloads)]

    def host_workloads(self, host_id: str) -> list[Workload]:
        """The host's workloads, in id order."""
        return [self._workloads[k] for k in sorted(self._by_host.get(host_id, ()))]

    def owners_of(self, ip: str, host_id: str) -> list[Workload]:
        """The workloads holding address `ip` as seen from the host `host_id`: its
        holder in the mesh, else its holder on that host (normally at most one)."""
        keys = self._ip_owners.get(("", ip)) or self._ip_owners.get((host_id, ip)) or ()
        return [self._workloads[k] for k in sorted(keys)]

    def rules(self) -> list[Rule]:
        return [cr.rule for cr in self._rules.values()]

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
        matched = self._matched.pop(workload_id, frozenset())
        for name in matched:
            self._members[name].discard(workload_id)
            self._member_changed(name, w, joined=False)
            self._leave(name, w)
        mesh_ips, _ = self._scoped[workload_id]
        self._disown_ips(w)
        del self._scoped[workload_id]
        self._policies.pop(workload_id, None)
        rows = self._rows.get(w.host_id)
        if rows is not None:
            rows.remove(workload_id, matched)
            if not rows.wids:
                del self._rows[w.host_id]
        self._rows_changed(w.host_id)
        if not mesh_ips:
            return {w.host_id}
        return self._affected_by(w.host_id, matched) | {w.host_id}

    def _disown_ips(self, w: Workload) -> None:
        """Forget that `w` holds its addresses (an address may have other holders)."""
        mesh_ips, local_ips = self._scoped[w.id]
        for scoped in [*(("", ip) for ip in mesh_ips), *((w.host_id, ip) for ip in local_ips)]:
            owners = self._ip_owners.get(scoped)
            if owners is not None:
                owners.discard(w.id)
                if not owners:
                    del self._ip_owners[scoped]

    def _member_changed(self, name: str, w: Workload, *, joined: bool) -> None:
        """Keep the cached address lists of the set's copies current (new lists,
        never edits, made when next read) and note them on the views of the hosts
        that hold them."""
        if name not in self._set_ips and not self._copies.get(name):
            return  # never built, so nobody holds it yet
        # An address stays in the set while another member holds it too.
        members = self._members[name]
        mesh_ips, local_ips = self._scoped[w.id]

        def moved(ips: list[str], scope: str) -> list[str]:
            return [
                ip
                for ip in ips
                if not any(o in members for o in self._ip_owners[(scope, ip)] if o != w.id)
            ]

        if mesh_ips and (gone := moved(mesh_ips, "")):
            for key in (name, *(f"{name}@{h}" for h in self._copies.get(name, ()))):
                self._edit_set(key, name, gone, joined=joined)
        if local_ips and (gone := moved(local_ips, w.host_id)):
            self._edit_set(f"{name}@{w.host_id}", name, gone, joined=joined)

    def _edit_set(self, key: str, name: str, moved: list[str], *, joined: bool) -> None:
        ips = self._set_ips.get(key)
        if ips is None:  # never built, so nobody holds it yet
            return
        edits = self._set_edits.get(key)
        if edits is None:
            edits = self._set_edits[key] = []
            encoded = self._set_jsons.pop(key, None)
            if encoded is not None:  # instructions compiled before may still be encoded
                self._previous_set_json[key] = (ips, encoded)
        edits += ((ip, joined) for ip in moved)
        if len(edits) > 32 + len(ips) // 4:  # unread for long: the list is made now
            self._set_list(key)
        content = self._set_hashes.get(key)
        if content is not None:
            for ip in moved:
                if joined:
                    content.put(ip)
                else:
                    content.discard(ip)
        for h in self._holders.get(key, ()):
            view = self._views[h]
            view.stale.add(name)
            view.stale_digests.add(name)
            view.digest = ""

    def _affected_by(self, host_id: str, matched: Iterable[str]) -> set[str]:
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
            out.update(self._member_hosts.get(name, ()))
        return False

    # ---- outputs ----------------------------------------------------------------

    def hosts(self) -> set[str]:
        return set(self._by_host)

    def set_mesh_host(self, host_id: str, peer: MeshPeer | None) -> set[str]:
        """A host joined the mesh (or again, with a new key or endpoint), or left it
        (`None`: revoked). Returns the hosts whose instructions may change: every
        mesh host (whose peers it may be) and itself."""
        before = self._mesh.get(host_id)
        if peer is None:
            self._mesh.pop(host_id, None)
        else:
            self._mesh[host_id] = peer
        if before == peer:
            return set()
        for view in self._views.values():
            view.mesh = None
            view.digest = ""
        return set(self._mesh) | {host_id}

    def compile_host(self, host_id: str, version: int) -> Instructions:
        """The management instructions of one host: its workloads' allows, the
        membership of the sets they reference, and the rules that are relevant."""
        view = self._view(host_id)
        if view.stale:
            sets = dict(view.sets)
            for name in view.stale:
                sets[name] = self._set_list(view.keys[name])
            view.sets = sets
            view.stale.clear()
        part = view.part
        return Instructions(
            host_id=host_id,
            version=version,
            workloads=part.workloads,
            sets=view.sets,
            rules=part.rules,
            mesh=self._mesh_part(host_id, view)[0],
        )

    def host_digest(self, host_id: str) -> str:
        """A digest of the host's instructions but their version: equal digests, equal
        content. Made of the digests of the parts, so it costs no encoding of sets."""
        view = self._view(host_id)
        if not view.digest:
            for name in view.stale_digests:
                view.set_digests[view.positions[name]] = self._set_digest(view.keys[name])
            view.stale_digests.clear()
            h = hashlib.sha256(view.part.digest)
            h.update(b"".join(view.set_digests))
            h.update(self._mesh_part(host_id, view)[1])
            view.digest = h.hexdigest()
        return view.digest

    def _mesh_part(self, host_id: str, view: _HostView) -> tuple[Mesh | None, bytes]:
        """The host's mesh part and its digest (b"" when it is not in the mesh)."""
        if view.mesh is None:
            own = self._mesh.get(host_id)
            if own is None:
                view.mesh = (None, b"")
            else:
                if view.part.any_peer:
                    hosts: Iterable[str] = self._mesh
                else:
                    hosts = {h for n in view.part.refs for h in self._mesh_hosts.get(n, ())}
                peers = sorted(self._mesh[h] for h in hosts if h != host_id and h in self._mesh)
                mesh = Mesh(pool=self._pool, subnet=own.subnet, peers=peers)
                view.mesh = (mesh, _digest(b"mesh", mesh))
        return view.mesh

    def compile_all(self, versions: Mapping[str, int] | None = None) -> dict[str, Instructions]:
        versions = versions or {}
        return {h: self.compile_host(h, versions.get(h, 0)) for h in sorted(self.hosts())}

    def encode(self, instr: Instructions) -> bytes:
        """`encode_instructions(instr)`, reusing the JSON of the parts it shares with
        what the compiler holds: a new version costs its changed parts and one copy."""
        view = self._views.get(instr.host_id)
        pieces = [b'{"host_id":', _ENCODER.encode(instr.host_id)]
        pieces.append(b',"version":%d,"workloads":' % instr.version)
        if view is not None and instr.workloads is view.part.workloads:
            # A current view: the host's rows hold exactly these workloads.
            if not view.workloads_json:
                view.workloads_json = self._rows[instr.host_id].encode()
            pieces += (b"[", view.workloads_json, b"]")
        else:
            pieces.append(_ENCODER.encode(instr.workloads))
        pieces.append(b',"sets":{')
        keys = view.keys if view is not None else {}
        for i, name in enumerate(sorted(instr.sets)):
            text = _ENCODER.encode(name)
            ips = instr.sets[name]
            pieces += (b"," if i else b"", text, b":", self._set_json(keys.get(name, name), ips))
        pieces.append(b'},"rules":')
        if view is not None and instr.rules is view.part.rules:
            if not view.rules_json:
                view.rules_json = _ENCODER.encode(instr.rules)
            pieces.append(view.rules_json)
        else:
            pieces.append(_ENCODER.encode(instr.rules))
        if instr.mesh is not None:
            pieces += (b',"mesh":', _ENCODER.encode(instr.mesh))
        pieces.append(b"}")
        return b"".join(pieces)

    def _set_json(self, key: str, ips: list[str]) -> bytes:
        current = key not in self._set_edits and self._set_ips.get(key) is ips
        if current or self._ip_sets.get(key) is ips:
            return self._set_encoded(key)
        previous = self._previous_set_json.get(key)
        if previous is not None and previous[0] is ips:
            return previous[1]
        return _ENCODER.encode(ips)

    # ---- cached parts -----------------------------------------------------------

    def _view(self, host_id: str) -> _HostView:
        view = self._views.get(host_id)
        if view is not None:
            return view
        part = self._host_part(host_id)
        keys = {name: self._key(name, host_id) for name in part.refs}
        view = self._views[host_id] = _HostView(
            part,
            keys,
            {name: self._set_list(key) for name, key in keys.items()},
        )
        for key in keys.values():
            self._holders.setdefault(key, set()).add(host_id)
        return view

    def _key(self, name: str, host_id: str) -> str:
        """The key of the copy of set `name` that `host_id` holds."""
        local = self._local_hosts.get(name)
        return f"{name}@{host_id}" if local and local.get(host_id) else name

    def _rows_changed(self, host_id: str) -> None:
        """The host's workloads changed: make its part again, and keep the rest of
        its view (sets, their digests, the mesh part) when the part references the
        same sets through the same copies, as it does unless a workload brought or
        took the host's only member of a selector combination or host-local copy."""
        view = self._views.get(host_id)
        if view is None:
            return
        if host_id not in self._rows:
            self._drop_view(host_id)
            return
        old, part = view.part, self._host_part(host_id)
        if (
            part.refs != old.refs
            or part.any_peer != old.any_peer
            or any(self._key(name, host_id) != key for name, key in view.keys.items())
        ):
            self._drop_view(host_id)
            return
        view.part = part
        view.digest = ""
        view.workloads_json = b""
        if part.rules != old.rules:
            view.rules_json = b""

    def _drop_view(self, host_id: str) -> None:
        view = self._views.pop(host_id, None)
        if view is not None:
            for key in view.keys.values():
                holders = self._holders[key]
                holders.discard(host_id)
                if not holders:
                    del self._holders[key]

    def _host_part(self, host_id: str) -> _HostPart:
        rows = self._rows.get(host_id)
        if rows is None:
            rows = self._rows[host_id] = _HostRows()
            for wid in self._by_host.get(host_id, ()):
                rows.insert(self._policies.get(wid) or self._policy(wid), self._matched[wid])
        referenced: set[str] = set()
        relevant: set[str] = set()
        any_peer = False
        for m in rows.matched:
            prof = self._profile(m)
            referenced |= prof.referenced
            relevant |= prof.relevant
            any_peer |= prof.any_peer
        rule_ids = sorted(relevant)
        rules = [self._rules[rid].rule for rid in rule_ids]
        # Lengths first, then fixed-size digests: no two contents hash the same bytes.
        hid = host_id.encode()
        n = len(rows.wids)
        h = hashlib.sha256(b"host %d %d %d\0" % (len(hid), n, len(rules)) + hid)
        h.update(rows.digest.digest())
        h.update(b"".join(self._rule_digests[rid] for rid in rule_ids))
        return _HostPart(
            workloads=list(rows.policies),
            refs=tuple(sorted(referenced)),
            rules=rules,
            digest=h.digest(),
            any_peer=any_peer,
        )

    def _policy(self, wid: str) -> _Policy:
        pol = self._policies.get(wid)
        if pol is not None:
            return pol
        w = self._workloads[wid]
        prof = self._profile(self._matched[wid])
        policy = WorkloadPolicy(
            workload_id=w.id,
            container_id=w.container_id,
            labels=w.labels,
            ips=sorted(w.ips),
            inbound=prof.inbound,
            outbound=prof.outbound,
            # Interned: `omit_defaults` leaves a field out only when it *is* the
            # default object, and a string read from the store is an equal copy.
            mode=sys.intern(w.mode),  # type: ignore[arg-type]
            visibility=sys.intern(w.visibility),  # type: ignore[arg-type]
        )
        digest = hashlib.sha256(_ENCODER.encode(policy)).digest()
        pol = self._policies[wid] = _Policy(policy, digest)
        return pol

    def _profile(self, matched: frozenset[str]) -> _Profile:
        prof = self._profiles.get(matched)
        if prof is None:
            as_prov = set(self._any_prov)
            as_cons = set(self._any_cons)
            for name in matched:
                as_prov |= self._prov_rules.get(name, set())
                as_cons |= self._cons_rules.get(name, set())
            referenced: set[str] = set()
            inbound = self._allows(sorted(as_prov), provider_side=True, referenced=referenced)
            outbound = self._allows(sorted(as_cons), provider_side=False, referenced=referenced)
            any_peer = any(a.peer is None for a in (*inbound, *outbound))
            prof = self._profiles[matched] = _Profile(
                inbound, outbound, frozenset(referenced), frozenset(as_prov | as_cons), any_peer
            )
        return prof

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

    def _set_list(self, key: str) -> list[str]:
        """The sorted addresses of a set copy: the mesh addresses of every member,
        and for a host's own copy its members' host-local addresses too."""
        ips = self._set_ips.get(key)
        if ips is not None:
            edits = self._set_edits.pop(key, None)
            if edits:
                ips = self._set_ips[key] = _edited(ips, edits)
            return ips
        blocks = self._ip_sets.get(key)
        if blocks is not None:
            return blocks
        name, _, host = key.partition("@")
        scoped = self._scoped
        out = {ip for m in self._members[name] for ip in scoped[m][0]}
        if host:
            w = self._workloads
            out.update(
                ip for m in self._members[name] if w[m].host_id == host for ip in scoped[m][1]
            )
            self._copies.setdefault(name, set()).add(host)
        ips = self._set_ips[key] = sorted(out)
        return ips

    def _set_digest(self, key: str) -> bytes:
        """The digest of the set's name and addresses (copies with the same addresses
        have the same digest), kept up to date by edits rather than made again."""
        content = self._set_hashes.get(key)
        if content is None:
            tag = key.partition("@")[0].encode()
            content = BucketDigest(tag, ((ip, b"") for ip in self._set_list(key)))
            self._set_hashes[key] = content
        return content.digest()

    def _set_encoded(self, key: str) -> bytes:
        """The copy's address list as JSON."""
        out = self._set_jsons.get(key)
        if out is None:
            out = self._set_jsons[key] = _ENCODER.encode(self._set_list(key))
        return out


def _edited(ips: list[str], edits: list[tuple[str, bool]]) -> list[str]:
    """A new sorted list: `ips` with each address joined or gone, in order."""
    new = list(ips)
    for ip, joined in edits:
        i = bisect.bisect_left(new, ip)
        present = i < len(new) and new[i] == ip
        if joined and not present:
            new.insert(i, ip)
        elif not joined and present:
            del new[i]
    return new


def _decrement(counter: Counter[str], key: str) -> bool:
    """Count one less of `key`; True when none is left."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
        return True
    return False


def _digest(kind: bytes, value: object) -> bytes:
    """SHA-256 of a kind tag and the value's deterministic JSON."""
    h = hashlib.sha256(kind + b"\0")
    h.update(_ENCODER.encode(value))
    return h.digest()
