"""The compiler: relevance (¶0021), determinism and incremental host fan-out."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Iterable

import msgspec
import pytest

from segd import policy
from segd.server.compiler import (
    Compiler,
    content_digest,
    encode_instructions,
)
from segd.wire import Allow, Instructions, Mesh, MeshPeer, Rule, Workload

# Workload addresses in these tests are mesh addresses (unique in the fleet, seen
# by every host) unless a test says otherwise; host-local ones are in 172.17/16.
POOL = "10.0.0.0/8"


def compiler(rules: Iterable[Rule] = (), workloads: Iterable[Workload] = ()) -> Compiler:
    return Compiler(rules, workloads, pool=POOL)


def rule(rid: str, prov: object, cons: object, *services: str) -> Rule:
    def sel(x: object) -> object:
        if x == "any":
            return "any"
        assert isinstance(x, list)
        return [policy.parse_labels(t, policy.DEFAULT_DIMENSIONS) for t in x]

    return Rule(id=rid, providers=sel(prov), consumers=sel(cons), services=list(services))  # type: ignore[arg-type]


def wl(wid: str, host: str, labels: str, *ips: str) -> Workload:
    return Workload(
        id=wid,
        host_id=host,
        container_id="c-" + wid,
        name=wid,
        labels=policy.parse_labels(labels, policy.DEFAULT_DIMENSIONS),
        ips=list(ips),
        key_id="k",
        paired_at=0.0,
    )


WEB = policy.set_name({"role": "web"})
DB = policy.set_name({"role": "db"})
R_WEB_DB = rule("r1", ["role=db"], ["role=web"], "tcp/5432")


def shop() -> Compiler:
    return compiler(
        [R_WEB_DB],
        [
            wl("w1", "A", "role=web", "10.0.0.1"),
            wl("d1", "B", "role=db", "10.0.0.2"),
            wl("o1", "C", "role=other", "10.0.0.3"),
        ],
    )


def test_provider_gets_inbound_from_consumer_set() -> None:
    i = shop().compile_host("B", 1)
    [p] = i.workloads
    assert p.workload_id == "d1"
    assert [(a.rule_id, a.peer, [str(s) for s in a.services]) for a in p.inbound] == [
        ("r1", WEB, ["tcp/5432"])
    ]
    assert p.outbound == []
    assert i.sets == {WEB: ["10.0.0.1"]}
    assert [r.id for r in i.rules] == ["r1"]


def test_consumer_gets_outbound_to_provider_set() -> None:
    i = shop().compile_host("A", 1)
    [p] = i.workloads
    assert [(a.peer) for a in p.outbound] == [DB]
    assert p.inbound == []
    assert i.sets == {DB: ["10.0.0.2"]}


def test_unrelated_host_gets_no_rules_and_no_membership() -> None:
    i = shop().compile_host("C", 1)
    [p] = i.workloads
    assert p.inbound == [] and p.outbound == []
    assert i.sets == {} and i.rules == []


@pytest.mark.parametrize(
    ("prov", "cons", "host", "inbound_peers", "outbound_peers"),
    [
        ("any", ["role=web"], "C", [WEB], []),  # any workload provides to web
        (["role=db"], "any", "B", [None], [DB]),  # db accepts from anywhere, and is "any" too
        (["role=db"], "any", "C", [], [DB]),  # anyone may reach db
        ("any", "any", "C", [None], [None]),
    ],
)
def test_any_sides(
    prov: object, cons: object, host: str, inbound_peers: list[object], outbound_peers: list[object]
) -> None:
    c = compiler(
        [rule("r1", prov, cons, "tcp/80")],
        [
            wl("w1", "A", "role=web", "10.0.0.1"),
            wl("d1", "B", "role=db", "10.0.0.2"),
            wl("o1", "C", "role=other", "10.0.0.3"),
        ],
    )
    [p] = c.compile_host(host, 1).workloads
    assert [a.peer for a in p.inbound] == inbound_peers
    assert [a.peer for a in p.outbound] == outbound_peers


def test_self_rule_gives_both_directions() -> None:
    c = compiler(
        [rule("r1", ["role=web"], ["role=web"], "tcp/80")], [wl("w1", "A", "role=web", "10.0.0.1")]
    )
    [p] = c.compile_host("A", 1).workloads
    assert [a.peer for a in p.inbound] == [WEB] and [a.peer for a in p.outbound] == [WEB]


def test_subset_selector_membership() -> None:
    c = compiler(
        [rule("r1", ["role=db,env=prod"], ["role=web"], "tcp/5432")],
        [
            wl("w1", "A", "role=web,env=dev", "10.0.0.1"),
            wl("d1", "B", "role=db,env=prod,app=shop", "10.0.0.2"),
            wl("d2", "B", "role=db,env=dev", "10.0.0.4"),
        ],
    )
    a = c.compile_host("A", 1)
    assert a.sets == {policy.set_name({"role": "db", "env": "prod"}): ["10.0.0.2"]}
    b = c.compile_host("B", 1)
    by_id = {p.workload_id: p for p in b.workloads}
    assert by_id["d1"].inbound and not by_id["d2"].inbound


def test_compile_is_deterministic_regardless_of_input_order() -> None:
    rules = [
        rule(f"r{i}", [f"role=r{i}"], [f"role=r{(i + 1) % 5}"], f"tcp/{1000 + i}") for i in range(5)
    ]
    wls = [wl(f"w{i}", f"H{i % 3}", f"role=r{i % 5}", f"10.0.1.{i}") for i in range(30)]
    a = compiler(rules, wls).compile_all()
    rnd = random.Random(7)
    rules2, wls2 = rules[:], wls[:]
    rnd.shuffle(rules2)
    rnd.shuffle(wls2)
    b = compiler(rules2, wls2).compile_all()
    assert {h: encode_instructions(i) for h, i in a.items()} == {
        h: encode_instructions(i) for h, i in b.items()
    }


def test_incremental_equals_full() -> None:
    rules = [
        rule(f"r{i}", [f"role=r{i}"], [f"role=r{(i + 1) % 5}"], f"tcp/{1000 + i}") for i in range(5)
    ]
    wls = [wl(f"w{i}", f"H{i % 4}", f"role=r{i % 5}", f"10.0.1.{i}") for i in range(40)]
    inc = compiler(rules)
    for w in wls:
        inc.add_workload(w)
    for w in wls[::3]:
        inc.remove_workload(w.id)
    full = compiler(rules, [w for i, w in enumerate(wls) if i % 3 != 0])
    assert inc.compile_all() == full.compile_all()


def test_affected_hosts_pairing_on_a_wakes_b_not_c() -> None:
    c = compiler(
        [rule("r1", ["role=db"], ["role=web"], "tcp/5432")],
        [wl("w1", "B", "role=web", "10.0.0.1"), wl("o1", "C", "role=other", "10.0.0.3")],
    )
    affected = c.add_workload(wl("d1", "A", "role=db", "10.0.0.2"))
    assert affected == {"A", "B"}
    assert c.remove_workload("d1") == {"A", "B"}


def test_affected_is_superset_of_changed() -> None:
    rules = [
        rule(f"r{i}", [f"role=r{i}"], [f"role=r{(i + 2) % 6}"], f"tcp/{1000 + i}") for i in range(6)
    ]
    c = compiler(rules)
    rnd = random.Random(3)
    live: list[str] = []
    for step in range(120):
        before = {h: content_digest(i) for h, i in c.compile_all().items()}
        if live and rnd.random() < 0.35:
            wid = live.pop(rnd.randrange(len(live)))
            affected = c.remove_workload(wid)
        else:
            wid = f"w{step}"
            live.append(wid)
            affected = c.add_workload(
                wl(wid, f"H{rnd.randrange(6)}", f"role=r{rnd.randrange(7)}", f"10.1.0.{step}")
            )
        after = {h: content_digest(i) for h, i in c.compile_all().items()}
        changed = {h for h in set(before) | set(after) if before.get(h) != after.get(h)}
        assert changed <= affected, (step, changed, affected)


def test_content_digest_ignores_version() -> None:
    c = shop()
    assert content_digest(c.compile_host("A", 1)) == content_digest(c.compile_host("A", 9))
    assert encode_instructions(c.compile_host("A", 1)) != encode_instructions(
        c.compile_host("A", 9)
    )


# ---- cached parts: the incremental compiler must equal a fresh one, always ----------


def _random_ops(seed: int, steps: int) -> list[tuple[str, object]]:
    """Adds (some replacing a live workload, some sharing an address, mesh and
    host-local addresses), removals, rule-set changes over selectors of one to
    three labels, and hosts joining and leaving the mesh."""
    rnd = random.Random(seed)
    roles, apps, envs = ["web", "api", "db"], ["a", "b"], ["prod", "dev"]

    def sel() -> str:
        parts = [f"role={rnd.choice(roles)}", f"app={rnd.choice(apps)}", f"env={rnd.choice(envs)}"]
        return ",".join(rnd.sample(parts, rnd.randint(1, 3)))

    def side() -> object:
        return "any" if rnd.random() < 0.15 else [sel() for _ in range(rnd.randint(1, 2))]

    def rules() -> list[Rule]:
        return [rule(f"r{i}", side(), side(), f"tcp/{80 + i}") for i in range(rnd.randint(1, 6))]

    ops: list[tuple[str, object]] = [("rules", rules())]
    live: list[str] = []
    for step in range(steps):
        x = rnd.random()
        if x < 0.05:
            ops.append(("rules", rules()))
        elif x < 0.1:
            n = rnd.randrange(5)
            ops.append(("mesh", (f"H{n}", peer(f"H{n}", n) if rnd.random() < 0.7 else None)))
        elif x < 0.3 and live:
            ops.append(("remove", live.pop(rnd.randrange(len(live)))))
        else:
            wid = rnd.choice(live) if live and rnd.random() < 0.1 else f"w{step}"
            if wid not in live:
                live.append(wid)
            # addresses repeat across workloads; mesh ones and host-local ones
            net = "10.2.0" if rnd.random() < 0.6 else "172.17.0"
            ip = f"{net}.{rnd.randrange(1, 40)}"
            labels = f"role={rnd.choice(roles)},app={rnd.choice(apps)},env={rnd.choice(envs)}"
            ops.append(("add", wl(wid, f"H{rnd.randrange(5)}", labels, ip)))
    return ops


def _apply(c: Compiler, op: str, arg: object) -> set[str]:
    if op == "rules":
        assert isinstance(arg, list)
        return c.set_rules(arg)
    if op == "remove":
        assert isinstance(arg, str)
        return c.remove_workload(arg)
    if op == "mesh":
        assert isinstance(arg, tuple)
        return c.set_mesh_host(*arg)
    assert isinstance(arg, Workload)
    return c.add_workload(arg)


@pytest.mark.parametrize("seed", range(6))
def test_incremental_with_cached_parts_equals_a_fresh_compile(seed: int) -> None:
    c = compiler()
    rules: list[Rule] = []
    live: dict[str, Workload] = {}
    mesh: dict[str, MeshPeer] = {}
    for step, (op, arg) in enumerate(_random_ops(seed, 150)):
        before = {h: c.host_digest(h) for h in c.hosts()}
        affected = _apply(c, op, arg)
        if op == "rules":
            assert isinstance(arg, list)
            rules = arg
        elif op == "remove":
            live.pop(str(arg), None)
        elif op == "mesh":
            assert isinstance(arg, tuple)
            host, joined = arg
            if joined is None:
                mesh.pop(host, None)
            else:
                mesh[host] = joined
        else:
            assert isinstance(arg, Workload)
            live[arg.id] = arg
        fresh = Compiler(rules, live.values(), pool=POOL, mesh=mesh.values())
        assert c.compile_all() == fresh.compile_all(), step
        for h in fresh.hosts():
            assert c.host_digest(h) == fresh.host_digest(h), step
            if before.get(h) != c.host_digest(h):
                assert h in affected, step


@pytest.mark.parametrize("seed", range(4))
def test_host_digest_changes_exactly_when_the_content_does(seed: int) -> None:
    c = compiler()
    seen: dict[str, str] = {}  # content digest -> host digest
    for op, arg in _random_ops(seed, 120):
        _apply(c, op, arg)
        for h, instr in c.compile_all().items():
            content, digest = h + content_digest(instr), c.host_digest(h)
            assert seen.setdefault(content, digest) == digest
    assert len(set(seen.values())) == len(seen)


@pytest.mark.parametrize("seed", range(4))
def test_encoding_reusing_parts_gives_the_same_bytes(seed: int) -> None:
    c = compiler()
    kept: list[tuple[bytes, Instructions]] = []  # older versions, encoded again later
    for step, (op, arg) in enumerate(_random_ops(seed, 120)):
        _apply(c, op, arg)
        for h in sorted(c.hosts()):
            instr = c.compile_host(h, step)
            assert c.encode(instr) == encode_instructions(instr), step
            kept.append((encode_instructions(instr), instr))
    for want, instr in kept[::7]:
        assert c.encode(instr) == want


def test_compiled_instructions_are_never_edited_by_later_changes() -> None:
    c = compiler([R_WEB_DB], [wl("w1", "A", "role=web", "10.0.0.1")])
    c.add_workload(wl("d1", "B", "role=db", "10.0.0.2"))
    snapshot = c.compile_host("A", 1)
    frozen = encode_instructions(snapshot)
    c.add_workload(wl("d2", "B", "role=db", "10.0.0.3"))
    c.add_workload(wl("w2", "A", "role=web", "10.0.0.4"))
    c.remove_workload("d1")
    assert encode_instructions(snapshot) == frozen
    assert c.compile_host("A", 2).sets == {DB: ["10.0.0.3"]}


def test_shared_address_stays_in_a_set_until_its_last_holder_leaves() -> None:
    c = compiler([R_WEB_DB], [wl("w1", "A", "role=web", "10.0.0.1")])
    c.add_workload(wl("d1", "B", "role=db", "10.0.0.9"))
    assert c.compile_host("A", 1).sets == {DB: ["10.0.0.9"]}
    c.add_workload(wl("d2", "C", "role=db", "10.0.0.9"))
    c.remove_workload("d1")
    assert c.compile_host("A", 1).sets == {DB: ["10.0.0.9"]}
    c.remove_workload("d2")
    assert c.compile_host("A", 1).sets == {DB: []}


def test_selector_index_matches_like_a_scan_with_many_dimensions() -> None:
    dims = [f"d{i}" for i in range(12)]
    rnd = random.Random(11)
    selectors = [
        {d: rnd.choice("xy") for d in rnd.sample(dims, rnd.randint(0, 4))} for _ in range(40)
    ]
    rules = [
        Rule(id=f"r{i}", providers=[s], consumers="any", services=["tcp/1"])
        for i, s in enumerate(selectors)
    ]
    c = compiler(rules)
    for i in range(60):
        labels = {d: rnd.choice("xy") for d in rnd.sample(dims, rnd.randint(0, 12))}
        w = Workload(
            id=f"w{i}", host_id="H", container_id=f"c{i}", name="", labels=labels,
            ips=[f"10.3.0.{i}"], key_id="k", paired_at=0.0,
        )  # fmt: skip
        c.add_workload(w)
        [p] = [p for p in c.compile_host("H", 1).workloads if p.workload_id == w.id]
        got = {a.rule_id for a in p.inbound}
        want = {r.id for r, s in zip(rules, selectors, strict=True) if policy.matches(labels, s)}
        assert got == want


# ---- address scopes, the mesh part, ip: peers ------------------------------------------


def peer(host: str, n: int) -> MeshPeer:
    return MeshPeer(host, f"key-{host}", f"192.0.2.{n}:51820", f"10.9.{n}.0/24")


def test_host_local_addresses_are_in_their_own_hosts_sets_only() -> None:
    c = compiler(
        [R_WEB_DB],
        [
            wl("w1", "A", "role=web", "172.17.0.2"),
            wl("w2", "B", "role=web", "172.17.0.2", "10.9.1.2"),  # same docker0 address
            wl("d1", "A", "role=db", "172.17.0.3"),
            wl("d2", "B", "role=db", "172.17.0.4", "10.9.1.4"),
            wl("d3", "C", "role=db", "10.9.2.5"),
        ],
    )
    a, b = c.compile_host("A", 1), c.compile_host("B", 1)
    assert a.sets == {DB: ["10.9.1.4", "10.9.2.5", "172.17.0.3"], WEB: ["10.9.1.2", "172.17.0.2"]}
    assert b.sets == {DB: ["10.9.1.4", "10.9.2.5", "172.17.0.4"], WEB: ["10.9.1.2", "172.17.0.2"]}
    # C has no host-local member: it holds the shared copy (mesh addresses only)
    assert c.compile_host("C", 1).sets == {WEB: ["10.9.1.2"]}


def test_a_host_local_pairing_affects_its_own_host_only() -> None:
    c = compiler([R_WEB_DB], [wl("w1", "A", "role=web", "10.9.0.2")])
    assert c.add_workload(wl("d1", "B", "role=db", "172.17.0.2")) == {"B"}
    assert c.compile_host("A", 1).sets == {DB: []}
    assert c.add_workload(wl("d2", "B", "role=db", "10.9.1.2")) == {"A", "B"}
    assert c.compile_host("A", 1).sets == {DB: ["10.9.1.2"]}
    assert c.remove_workload("d1") == {"B"}
    assert c.compile_host("B", 2).sets == {WEB: ["10.9.0.2"]}


def test_without_a_pool_every_address_is_host_local() -> None:
    c = Compiler(
        [R_WEB_DB], [wl("w1", "A", "role=web", "10.0.0.1"), wl("d1", "B", "role=db", "10.0.0.1")]
    )
    assert c.compile_host("A", 1).sets == {DB: []}
    assert c.compile_host("B", 1).sets == {WEB: []}


def test_mesh_peers_are_the_hosts_with_members_of_the_sets_held() -> None:
    c = Compiler(
        [R_WEB_DB],
        [
            wl("w1", "A", "role=web", "10.9.0.2"),
            wl("d1", "B", "role=db", "10.9.1.2"),
            wl("d2", "C", "role=db", "172.17.0.2"),  # host-local only: no mesh traffic
            wl("o1", "D", "role=other", "10.9.3.2"),
        ],
        pool="10.9.0.0/16",
        mesh=[peer("A", 0), peer("B", 1), peer("C", 2), peer("D", 3)],
    )
    mesh = {h: c.compile_host(h, 1).mesh for h in "ABCD"}
    assert all(m is not None and m.pool == "10.9.0.0/16" for m in mesh.values())
    assert mesh["A"] == Mesh("10.9.0.0/16", "10.9.0.0/24", [peer("B", 1)])
    assert mesh["B"] == Mesh("10.9.0.0/16", "10.9.1.0/24", [peer("A", 0)])
    assert mesh["C"] == Mesh("10.9.0.0/16", "10.9.2.0/24", [peer("A", 0)])
    assert mesh["D"] == Mesh("10.9.0.0/16", "10.9.3.0/24", [])
    # a host not in the mesh gets no mesh part; one leaving is dropped by its peers
    assert c.set_mesh_host("B", None) == {"A", "C", "D", "B"}
    assert c.compile_host("A", 2).mesh == Mesh("10.9.0.0/16", "10.9.0.0/24", [])
    assert c.compile_host("B", 2).mesh is None
    assert c.set_mesh_host("B", peer("B", 1)) == {"A", "B", "C", "D"}
    assert c.set_mesh_host("B", peer("B", 1)) == set()  # no change


def test_any_makes_every_mesh_host_a_peer() -> None:
    c = Compiler(
        [rule("r1", ["role=db"], "any", "tcp/5432")],
        [wl("d1", "A", "role=db", "10.9.0.2")],
        pool="10.9.0.0/16",
        mesh=[peer("A", 0), peer("B", 1), peer("C", 2)],
    )
    mesh = c.compile_host("A", 1).mesh
    assert mesh is not None and [p.host_id for p in mesh.peers] == ["B", "C"]


def test_mesh_part_changes_the_digest_and_wakes_the_peers() -> None:
    c = Compiler(
        [R_WEB_DB],
        [wl("w1", "A", "role=web", "10.9.0.2"), wl("o1", "C", "role=other", "10.9.2.2")],
        pool="10.9.0.0/16",
        mesh=[peer("A", 0), peer("C", 2)],
    )
    before = {h: c.host_digest(h) for h in "AC"}
    c.set_mesh_host("B", peer("B", 1))
    assert {h: c.host_digest(h) for h in "AC"} == before  # B has no workload yet
    affected = c.add_workload(wl("d1", "B", "role=db", "10.9.1.2"))
    assert affected == {"A", "B"}
    assert c.host_digest("A") != before["A"] and c.host_digest("C") == before["C"]
    mesh = c.compile_host("A", 2).mesh
    assert mesh is not None and mesh.peers == [peer("B", 1)]
    moved = MeshPeer("B", "key-new", "192.0.2.99:51820", "10.9.1.0/24")
    digest = c.host_digest("A")
    c.set_mesh_host("B", moved)
    assert c.host_digest("A") != digest
    mesh = c.compile_host("A", 3).mesh
    assert mesh is not None and mesh.peers == [moved]


def test_ip_peers_compile_to_one_constant_set_of_blocks() -> None:
    r = Rule(
        id="r1",
        providers=[{"role": "db"}],
        consumers=[],
        services=["tcp/5432"],
        consumer_ips=["203.0.113.0/24", "2001:db8::/32", "203.0.113.0/25"],
    )
    mixed = Rule(
        id="r2",
        providers=[],
        consumers=[{"role": "db"}],
        services=["tcp/443"],
        provider_ips=["198.51.100.0/24"],
    )
    c = compiler([r, mixed], [wl("d1", "A", "role=db", "10.0.0.2")])
    ext = policy.ip_set_name(r.consumer_ips)
    out = policy.ip_set_name(mixed.provider_ips)
    i = c.compile_host("A", 1)
    assert i.sets == {ext: ["203.0.113.0/24", "2001:db8::/32"], out: ["198.51.100.0/24"]}
    [p] = i.workloads
    assert [(a.rule_id, a.peer) for a in p.inbound] == [("r1", ext)]
    assert [(a.rule_id, a.peer) for a in p.outbound] == [("r2", out)]
    assert c.encode(i) == encode_instructions(i)
    # nobody matches a block: other hosts are not affected by its rule
    assert c.add_workload(wl("o1", "B", "role=other", "10.0.0.3")) == {"B"}


def test_set_mode_changes_only_that_workloads_policy_and_host() -> None:
    rules = [rule("r1", ["role=db"], ["role=web"], "tcp/5432")]
    web = wl("w1", "h1", "role=web", "10.0.0.1")
    db = wl("w2", "h2", "role=db", "10.0.0.2")
    c = Compiler(rules, [web, db])
    before = {h: c.host_digest(h) for h in ("h1", "h2")}
    encoded = c.encode(c.compile_host("h2", 1))
    assert b'"mode"' not in encoded  # full is the default: left out
    changed = msgspec.structs.replace(db, mode="visibility", visibility="enhanced")
    assert c.set_mode(changed) == {"h2"}
    assert c.host_digest("h1") == before["h1"]
    assert c.host_digest("h2") != before["h2"]
    [pol] = c.compile_host("h2", 2).workloads
    assert (pol.mode, pol.visibility, pol.inbound) == ("visibility", "enhanced", [
        Allow(rule_id="r1", peer=policy.set_name({"role": "web"}), services=[
            policy.Service("tcp", 5432, 5432)])
    ])  # fmt: skip
    instr = c.compile_host("h2", 2)
    assert c.encode(instr) == encode_instructions(instr)
    assert c.set_mode(changed) == set()  # no change, no host
    assert c.set_mode(msgspec.structs.replace(db, id="w_gone")) == set()
    # a fresh compiler from the same workloads compiles the same
    fresh = Compiler(rules, [web, changed])
    assert fresh.host_digest("h2") == c.host_digest("h2")


def test_default_mode_read_from_the_store_is_left_out_of_the_policy() -> None:
    """A mode string read from SQLite is an equal copy of "full", not the default
    object itself, which `omit_defaults` would still encode."""
    stored = "".join(["fu", "ll"])
    w = msgspec.structs.replace(wl("w1", "h1", "role=web", "10.0.0.1"), mode=stored)
    c = Compiler([], [w])
    instr = c.compile_host("h1", 1)
    encoded = c.encode(instr)
    assert b'"mode"' not in encoded
    assert encoded == encode_instructions(msgspec.json.decode(encoded, type=Instructions))


def test_a_set_nobody_reads_does_not_pile_up_its_changes() -> None:
    """Host A holds the db set but its agent never reads (it is down): 20,000
    pairings and unpairings of db workloads leave the compiler's memory as it was."""
    c = shop()
    c.compile_host("A", 1)
    c.host_digest("A")

    def churn(n: int) -> None:
        for i in range(n):
            c.add_workload(wl(f"x{i}", "B", "role=db", f"10.1.{i // 250}.{i % 250 + 1}"))
            c.host_digest("A")  # what publishing asks for
            c.remove_workload(f"x{i}")
            c.host_digest("A")

    churn(2_000)  # caches and digests at their working size
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        churn(20_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 200_000, grown  # 40,000 kept changes would be megabytes
    assert c.compile_host("A", 2).sets == {DB: ["10.0.0.2"]}
