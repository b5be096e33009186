"""Host gate rendering: tables of cases, pure."""

from __future__ import annotations

import pytest

from segd.firewall import gate, render


def _drops(port: str, side: str) -> list[str]:
    return [
        f'\t\t{port} "veth*" ip {side} @subnets4 ip {side} != @allowed4 drop',
        f'\t\t{port} "veth*" ip6 {side} @subnets6 ip6 {side} != @allowed6 drop',
    ]


def _chain(hook: str, lines: list[str]) -> list[str]:
    head = f"\t\ttype filter hook {hook} priority -200; policy accept;"
    return [f"\tchain {hook} {{", head, *lines, "\t}"]


def expected_gate(a4: str = "", a6: str = "", s4: str = "", s6: str = "") -> str:
    lines = ["add table bridge segd_gate", "delete table bridge segd_gate"]
    lines += ["table bridge segd_gate {"]
    for name, typ, interval, elems in (
        ("allowed4", "ipv4_addr", False, a4),
        ("allowed6", "ipv6_addr", False, a6),
        ("subnets4", "ipv4_addr", True, s4),
        ("subnets6", "ipv6_addr", True, s6),
    ):
        lines += [f"\tset {name} {{", f"\t\ttype {typ}"]
        lines += ["\t\tflags interval"] if interval else []
        lines += [f"\t\telements = {{ {elems} }}"] if elems else []
        lines += ["\t}"]
    ins, outs = _drops("iifname", "saddr"), _drops("oifname", "daddr")
    lines += _chain("forward", ins + outs) + _chain("input", ins) + _chain("output", outs)
    return "\n".join([*lines, "}"]) + "\n"


GATES: list[tuple[str, list[str], list[str], str]] = [
    ("empty gate", [], [], expected_gate()),
    (
        "docker default bridge, two enforced containers",
        ["172.17.0.3", "172.17.0.2"],
        ["172.17.0.0/16"],
        expected_gate(a4="172.17.0.2, 172.17.0.3", s4="172.17.0.0/16"),
    ),
    (
        "both families; subnets normalised, merged and sorted",
        ["fd00:dead::2", "10.213.0.2", "10.213.0.2"],
        ["172.18.0.1/16", "10.213.0.0/24", "10.213.1.0/24", "fd00:dead::/64", "172.18.5.0/24"],
        expected_gate(
            a4="10.213.0.2",
            a6="fd00:dead::2",
            s4="10.213.0.0/23, 172.18.0.0/16",
            s6="fd00:dead::/64",
        ),
    ),
]


@pytest.mark.parametrize(
    ("allowed", "subnets", "expected"), [g[1:] for g in GATES], ids=[g[0] for g in GATES]
)
def test_render_gate_replace(allowed: list[str], subnets: list[str], expected: str) -> None:
    assert gate.render_gate_replace(allowed, subnets) == expected


_IN, _OUT = _drops("iifname", "saddr"), _drops("oifname", "daddr")
RULES = [
    (hook, r)
    for hook, rs in (("forward", _IN + _OUT), ("input", _IN), ("output", _OUT))
    for r in rs
]


def test_render_gate_rewrites_in_place() -> None:
    text = gate.render_gate(["172.17.0.2", "fd00::2"], ["172.17.0.0/16"])
    declared = expected_gate().split("table bridge segd_gate {\n")[1]
    declared = "\n".join(line for line in declared.splitlines() if "drop" not in line)
    assert text == (
        "table bridge segd_gate {\n" + declared + "\nflush table bridge segd_gate\n"
        "flush set bridge segd_gate allowed4\n"
        "add element bridge segd_gate allowed4 { 172.17.0.2 }\n"
        "flush set bridge segd_gate allowed6\n"
        "add element bridge segd_gate allowed6 { fd00::2 }\n"
        "flush set bridge segd_gate subnets4\n"
        "add element bridge segd_gate subnets4 { 172.17.0.0/16 }\n"
        "flush set bridge segd_gate subnets6\n"
        + "".join(f"add rule bridge segd_gate {hook} {rule.strip()}\n" for hook, rule in RULES)
    )


def test_gate_rewrite_is_one_transaction() -> None:
    text = gate.render_gate([], [])
    assert render.transactions(text) == [text]


def test_gate_add() -> None:
    assert gate.render_gate_add([]) is None
    assert gate.render_gate_add(["fd00::3", "10.0.0.2", "10.0.0.1"]) == (
        "add element bridge segd_gate allowed4 { 10.0.0.1, 10.0.0.2 }\n"
        "add element bridge segd_gate allowed6 { fd00::3 }\n"
    )


def test_gate_remove_is_idempotent_by_construction() -> None:
    assert gate.render_gate_remove([]) is None
    assert gate.render_gate_remove(["10.0.0.1"]) == (
        "add element bridge segd_gate allowed4 { 10.0.0.1 }\n"
        "delete element bridge segd_gate allowed4 { 10.0.0.1 }\n"
    )


def test_gate_subnets_flush_then_add() -> None:
    assert gate.render_gate_subnets(["172.17.0.0/16", "fd00::/64"]) == (
        "flush set bridge segd_gate subnets4\n"
        "flush set bridge segd_gate subnets6\n"
        "add element bridge segd_gate subnets4 { 172.17.0.0/16 }\n"
        "add element bridge segd_gate subnets6 { fd00::/64 }\n"
    )
    assert gate.render_gate_subnets([]) == (
        "flush set bridge segd_gate subnets4\nflush set bridge segd_gate subnets6\n"
    )


@pytest.mark.parametrize(
    "subnet", ["172.17.0.0/16 } ; flush ruleset", "172.17.0.0/33", "docker0", "", "fe80::/64%eth0"]
)
def test_hostile_subnets_are_refused(subnet: str) -> None:
    with pytest.raises(ValueError, match="invalid subnet"):
        gate.render_gate([], [subnet])
    with pytest.raises(ValueError, match="invalid subnet"):
        gate.render_gate_replace([], [subnet])
    with pytest.raises(ValueError, match="invalid subnet"):
        gate.render_gate_subnets([subnet])


@pytest.mark.parametrize("ip", ["1.2.3.4 } ; flush ruleset", "172.17.0.0/16", "fe80::1%veth0"])
def test_hostile_gate_ips_are_refused(ip: str) -> None:
    for fn in (gate.render_gate_add, gate.render_gate_remove):
        with pytest.raises(ValueError, match="invalid IP address"):
            fn([ip])
    with pytest.raises(ValueError, match="invalid IP address"):
        gate.render_gate([ip], [])
