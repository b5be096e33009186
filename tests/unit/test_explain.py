"""`explain` over compiled policies: which rule allows a connection, or why it is dropped."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from segd import wire
from segd.errors import InvalidInput, NotFound
from segd.server import explain
from segd.server.compiler import Compiler


def wl(wid: str, host: str, ip: str, mode: wire.Mode = "full", **labels: str) -> wire.Workload:
    return wire.Workload(
        id=wid,
        host_id=host,
        container_id=wid.replace("w_", "c") * 4,
        name=wid.removeprefix("w_"),
        labels=labels,
        ips=[ip],
        key_id="k_1",
        paired_at=0.0,
        mode=mode,
    )


def rule(rid: str, prov: Any, cons: Any, *services: str) -> wire.Rule:
    return wire.Rule(id=rid, providers=prov, consumers=cons, services=list(services))


WEB = wl("w_web", "h1", "10.0.0.2", role="web", app="shop")
DB = wl("w_db", "h1", "10.0.0.3", role="db", app="shop")
OTHER = wl("w_other", "h1", "10.0.0.4", role="other", app="shop")
FAR = wl("w_far", "h2", "10.1.0.5", role="web", app="shop")
RULES = [
    rule("r_web_db", [{"role": "db"}], [{"role": "web"}], "tcp/5432"),
    rule("r_dns", "any", [{"app": "shop"}], "udp/53"),
    rule("r_ping", [{"role": "web"}], "any", "icmp"),
]


def model(workloads: list[wire.Workload], locked: dict[str, list[str]] | None = None,
          subnets: dict[str, str] | None = None) -> explain.Model:  # fmt: skip
    # Hosts with a mesh subnet hold mesh addresses (the pool covers those subnets).
    c = Compiler(RULES, workloads, pool="10.0.0.0/8" if subnets else "")
    policies: dict[str, wire.WorkloadPolicy] = {}
    sets: dict[str, dict[str, list[str]]] = {}
    for host in c.hosts():
        instr = c.compile_host(host, 0)
        policies.update((p.workload_id, p) for p in instr.workloads)
        sets[host] = instr.sets
    return explain.Model(workloads, policies, sets, RULES, locked or {}, subnets or {})


@pytest.mark.parametrize(
    ("src", "dst", "port", "verdict", "reason", "rule_id"),
    [
        (WEB, DB, "5432", "allowed", "rule", "r_web_db"),
        (DB, WEB, "5432", "blocked", "no_rule", ""),  # the rule is one way
        (WEB, DB, "5433", "blocked", "no_rule", ""),
        (OTHER, DB, "5432", "blocked", "no_rule", ""),
        (WEB, DB, "5432/udp", "blocked", "no_rule", ""),
        (WEB, "192.0.2.53", "53/udp", "allowed", "rule", "r_dns"),  # to any address
        (DB, "192.0.2.53", "53/tcp", "blocked", "no_rule", ""),
        ("192.0.2.1", WEB, "icmp", "allowed", "rule", "r_ping"),  # from any address
        ("192.0.2.1", DB, "icmp", "blocked", "no_rule", ""),
        ("192.0.2.1", "192.0.2.2", "80", "allowed", "outside", ""),
        (WEB, WEB, "80", "allowed", "same_workload", ""),
        (FAR, DB, "5432", "blocked", "host_local", ""),  # another host, no mesh
    ],
)
def test_explain_table(
    src: explain.End, dst: explain.End, port: str, verdict: str, reason: str, rule_id: str
) -> None:
    proto, number = explain.parse_port(port)
    got = explain.explain(src, dst, proto, number, model([WEB, DB, OTHER, FAR]))
    assert (got.verdict, got.reason, got.rule_id) == (verdict, reason, rule_id), got


def test_each_side_is_judged_on_its_own_table() -> None:
    """web's table lets it out to db (r_web_db), db's lets it in: two steps, one rule."""
    got = explain.explain(WEB, DB, "tcp", 5432, model([WEB, DB]))
    assert got.steps == ["out of w_web: rule r_web_db", "into w_db: rule r_web_db"]
    assert got.src.workload_id == "w_web" and got.dst.ip == "10.0.0.3"


@pytest.mark.parametrize(
    ("src_mode", "dst_mode", "verdict", "reason"),
    [
        ("full", "full", "blocked", "no_rule"),
        ("visibility", "full", "blocked", "no_rule"),  # a full-mode peer enforces its side
        ("full", "visibility", "blocked", "no_rule"),
        ("visibility", "visibility", "potentially_blocked", "mode_visibility"),
        ("idle", "visibility", "potentially_blocked", "mode_visibility"),
        ("idle", "idle", "allowed", "mode_idle"),
        ("idle", "full", "blocked", "no_rule"),
    ],
)
def test_modes(src_mode: wire.Mode, dst_mode: wire.Mode, verdict: str, reason: str) -> None:
    src = wl("w_a", "h1", "10.0.0.7", src_mode, role="other")
    dst = wl("w_b", "h1", "10.0.0.8", dst_mode, role="db")
    got = explain.explain(src, dst, "tcp", 5432, model([src, dst]))
    assert (got.verdict, got.reason) == (verdict, reason)


def test_an_allowed_connection_to_an_idle_workload_names_the_rule() -> None:
    db = wl("w_db", "h1", "10.0.0.3", "idle", role="db")
    got = explain.explain(WEB, db, "tcp", 5432, model([WEB, db]))
    assert (got.verdict, got.reason, got.rule_id) == ("allowed", "mode_idle", "r_web_db")
    assert got.steps[1] == "into w_db: mode idle, no table"


def test_a_near_miss_names_the_rule_and_the_labels() -> None:
    got = explain.explain(OTHER, DB, "tcp", 5432, model([OTHER, DB]))
    assert "rule r_web_db would allow it if w_other had role=web" in got.steps
    assert got.reason == "no_rule"


def test_locked_label() -> None:
    """The label that differs is locked by the workload's profile: it cannot ask for web."""
    got = explain.explain(OTHER, DB, "tcp", 5432, model([OTHER, DB], locked={"w_other": ["role"]}))
    assert (got.verdict, got.reason) == ("blocked", "locked_label")


def test_a_mesh_subnet_makes_another_hosts_address_reachable() -> None:
    far_db = wl("w_fdb", "h2", "10.1.0.9", role="db")
    m = model([WEB, far_db], subnets={"h1": "10.0.0.0/24", "h2": "10.1.0.0/24"})
    got = explain.explain(WEB, far_db, "tcp", 5432, m)
    assert (got.verdict, got.rule_id) == ("allowed", "r_web_db")
    assert explain.explain(WEB, far_db, "tcp", 5432, model([WEB, far_db])).reason == "host_local"


def test_resolve() -> None:
    ws = [WEB, DB]
    assert explain.resolve("w_db", ws, "src") is DB
    assert explain.resolve("db", ws, "src") is DB  # container name
    assert explain.resolve(DB.container_id[:12], ws, "src") is DB
    assert explain.resolve("10.0.0.2", ws, "src") is WEB
    assert explain.resolve("192.0.2.1", ws, "src") == "192.0.2.1"
    assert explain.resolve("2001:db8::0:1", ws, "src") == "2001:db8::1"
    with pytest.raises(NotFound):
        explain.resolve("nobody", ws, "src")
    twins = [WEB, msgspec.structs.replace(wl("w_web2", "h1", "10.0.0.9"), name="web")]
    with pytest.raises(InvalidInput, match="2 workloads are named"):
        explain.resolve("web", twins, "src")


def test_an_address_host_local_on_two_hosts_needs_a_workload_named() -> None:
    twin = wl("w_twin", "h2", "10.0.0.2", role="web", app="shop")  # same docker0 address
    with pytest.raises(InvalidInput, match="host-local address on several hosts"):
        explain.resolve("10.0.0.2", [WEB, twin], "src")
    assert explain.resolve("w_twin", [WEB, twin], "src") is twin


def test_a_container_refused_a_pairing_is_isolated() -> None:
    refused = explain.Unpaired("10.0.0.66", "h1", "f" * 64, "key_revoked")
    m = model([WEB, DB])
    got = explain.explain(refused, DB, "tcp", 5432, m)
    assert (got.verdict, got.reason) == ("blocked", "src_unpaired")
    assert got.src == wire.FlowEnd(
        ip="10.0.0.66", kind="unpaired", host_id="h1", container_id="f" * 64
    )
    assert explain.explain(WEB, refused, "udp", 53, m).reason == "dst_unpaired"
    assert explain.explain("192.0.2.1", refused, "tcp", 80, m).reason == "dst_unpaired"
    assert explain.resolve("10.0.0.66", [WEB], "src", {"10.0.0.66": refused}.get) is refused
    assert explain.resolve("10.0.0.2", [WEB], "src", {"10.0.0.2": refused}.get) is WEB


@pytest.mark.parametrize("bad", ["", "0", "65536", "80/sctp", "x", "80/", "-1", "٨٠"])
def test_bad_ports(bad: str) -> None:
    with pytest.raises(InvalidInput):
        explain.parse_port(bad)
