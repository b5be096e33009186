"""Host gate plans: tables of cases, pure."""

from __future__ import annotations

import pytest

from segd.firewall import gate
from segd.firewall.gate import GateEntry
from segd.firewall.plan import Plan


def _drops(port: str, side: str) -> list[str]:
    """Each drop after a rate-limited log of the same match, as the container sees it."""
    seen = "out" if port == "iifname" else "in"
    log = f'limit rate 100/second burst 200 packets log group 7 prefix "segd:{seen}:b"'
    m4 = f'{port} "veth*" ip {side} @subnets4 {port} . ip {side} != @allowed4'
    m6 = f'{port} "veth*" ip6 {side} @subnets6 {port} . ip6 {side} != @allowed6'
    return [f"\t\t{m4} {log}", f"\t\t{m4} drop", f"\t\t{m6} {log}", f"\t\t{m6} drop"]


def _chain(hook: str, lines: list[str]) -> list[str]:
    head = f"\t\ttype filter hook {hook} priority -200; policy accept;"
    return [f"\tchain {hook} {{", head, *lines, "\t}"]


def expected_gate(a4: str = "", a6: str = "", s4: str = "", s6: str = "") -> str:
    lines = ["add table bridge segd_gate", "delete table bridge segd_gate"]
    lines += ["table bridge segd_gate {"]
    for name, typ, interval, elems in (
        ("allowed4", "ifname . ipv4_addr", False, a4),
        ("allowed6", "ifname . ipv6_addr", False, a6),
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


Entries = list[tuple[str, str]]

DROP_SHADOW = "add table bridge segd_gate_shadow\ndelete table bridge segd_gate_shadow\n"


def replace_plan(script: str) -> Plan:
    """The replace behind a shadow that is committed first: four transactions."""
    body = script.split("table bridge segd_gate {\n", 1)[1]
    shadow = "table bridge segd_gate_shadow {\n" + body
    return Plan("gate_replace", (DROP_SHADOW, shadow, script, DROP_SHADOW))


GATES: list[tuple[str, Entries, list[str], str]] = [
    ("empty gate", [], [], expected_gate()),
    (
        "docker default bridge, two enforced containers",
        [("veth9f3a1c2", "172.17.0.3"), ("veth0b7e4d1", "172.17.0.2")],
        ["172.17.0.0/16"],
        expected_gate(
            a4='"veth0b7e4d1" . 172.17.0.2, "veth9f3a1c2" . 172.17.0.3', s4="172.17.0.0/16"
        ),
    ),
    (
        "both families; duplicates merged; subnets normalised, merged and sorted",
        [
            GateEntry("veth1", "fd00:dead:0::2"),
            GateEntry("veth1", "10.213.0.2"),
            ("veth1", "10.213.0.2"),
        ],
        ["172.18.0.1/16", "10.213.0.0/24", "10.213.1.0/24", "fd00:dead::/64", "172.18.5.0/24"],
        expected_gate(
            a4='"veth1" . 10.213.0.2',
            a6='"veth1" . fd00:dead::2',
            s4="10.213.0.0/23, 172.18.0.0/16",
            s6="fd00:dead::/64",
        ),
    ),
    (
        "one address behind two ports (a stale entry and its successor): both kept",
        [("vethb", "172.17.0.2"), ("vetha", "172.17.0.2"), ("vetha", "172.17.0.10")],
        [],
        expected_gate(
            a4='"vetha" . 172.17.0.2, "vethb" . 172.17.0.2, "vetha" . 172.17.0.10',
        ),
    ),
    (
        "every character a port name may have",
        [("veth_a.b@c-D9", "10.0.0.1"), ("veth", "10.0.0.2")],
        [],
        expected_gate(a4='"veth_a.b@c-D9" . 10.0.0.1, "veth" . 10.0.0.2'),
    ),
]


@pytest.mark.parametrize(
    ("entries", "subnets", "expected"), [g[1:] for g in GATES], ids=[g[0] for g in GATES]
)
def test_render_gate_replace(entries: Entries, subnets: list[str], expected: str) -> None:
    assert gate.render_gate_replace(entries, subnets) == replace_plan(expected)


_IN, _OUT = _drops("iifname", "saddr"), _drops("oifname", "daddr")
RULES = [
    (hook, r)
    for hook, rs in (("forward", _IN + _OUT), ("input", _IN), ("output", _OUT))
    for r in rs
]


def test_render_gate_rewrites_in_place_with_the_replace_as_fallback() -> None:
    entries, subnets = [("veth1", "172.17.0.2"), ("veth1", "fd00::2")], ["172.17.0.0/16"]
    plan = gate.render_gate(entries, subnets)
    declared = expected_gate().split("table bridge segd_gate {\n")[1]
    declared = "\n".join(line for line in declared.splitlines() if "@allowed" not in line)
    in_place = (
        "table bridge segd_gate {\n" + declared + "\nflush table bridge segd_gate\n"
        "add table bridge segd_gate_shadow\ndelete table bridge segd_gate_shadow\n"
        "flush set bridge segd_gate allowed4\n"
        'add element bridge segd_gate allowed4 { "veth1" . 172.17.0.2 }\n'
        "flush set bridge segd_gate allowed6\n"
        'add element bridge segd_gate allowed6 { "veth1" . fd00::2 }\n'
        "flush set bridge segd_gate subnets4\n"
        "add element bridge segd_gate subnets4 { 172.17.0.0/16 }\n"
        "flush set bridge segd_gate subnets6\n"
        + "".join(f"add rule bridge segd_gate {hook} {rule.strip()}\n" for hook, rule in RULES)
    )
    assert plan == Plan("gate", (in_place,), gate.render_gate_replace(entries, subnets))


def test_gate_add() -> None:
    assert gate.render_gate_add([]) is None
    entries = [("veth2", "fd00::3"), ("veth1", "10.0.0.2"), ("veth1", "10.0.0.1")]
    assert gate.render_gate_add(entries) == Plan(
        "gate_add",
        (
            'add element bridge segd_gate allowed4 { "veth1" . 10.0.0.1, "veth1" . 10.0.0.2 }\n'
            'add element bridge segd_gate allowed6 { "veth2" . fd00::3 }\n',
        ),
    )


def test_gate_remove_is_idempotent_by_construction() -> None:
    assert gate.render_gate_remove([]) is None
    assert gate.render_gate_remove([GateEntry("veth1", "10.0.0.1")]) == Plan(
        "gate_remove",
        (
            'add element bridge segd_gate allowed4 { "veth1" . 10.0.0.1 }\n'
            'delete element bridge segd_gate allowed4 { "veth1" . 10.0.0.1 }\n',
        ),
    )


def test_gate_subnets_flush_then_add() -> None:
    assert gate.render_gate_subnets(["172.17.0.0/16", "fd00::/64"]).txs == (
        "flush set bridge segd_gate subnets4\n"
        "flush set bridge segd_gate subnets6\n"
        "add element bridge segd_gate subnets4 { 172.17.0.0/16 }\n"
        "add element bridge segd_gate subnets6 { fd00::/64 }\n",
    )
    assert gate.render_gate_subnets([]).txs == (
        "flush set bridge segd_gate subnets4\nflush set bridge segd_gate subnets6\n",
    )


def test_gate_removal_takes_the_shadow_too() -> None:
    assert gate.render_gate_removal() == Plan(
        "gate_removal",
        ("add table bridge segd_gate\ndelete table bridge segd_gate\n" + DROP_SHADOW,),
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


def _every_entry_renderer_refuses(entry: object, match: str) -> None:
    entries: list[tuple[str, str]] = [entry]  # type: ignore[list-item]
    with pytest.raises(ValueError, match=match):
        gate.render_gate_add(entries)
    with pytest.raises(ValueError, match=match):
        gate.render_gate_remove(entries)
    with pytest.raises(ValueError, match=match):
        gate.render_gate(entries, [])
    with pytest.raises(ValueError, match=match):
        gate.render_gate_replace(entries, [])


@pytest.mark.parametrize("ip", ["1.2.3.4 } ; flush ruleset", "172.17.0.0/16", "fe80::1%veth0", ""])
def test_hostile_gate_ips_are_refused(ip: str) -> None:
    _every_entry_renderer_refuses(("veth1", ip), "invalid IP address")


HOSTILE_PORTS = [
    'veth1" . 1.2.3.4 }; flush ruleset; #',  # a quote closing the string
    "veth1 } ; flush ruleset",  # a brace and spaces
    "veth1 x",
    "veth\t1",
    "veth1\n",
    "veth1\0",
    "veth{1}",
    "veth*",  # a wildcard would admit the address on every port
    "veth\\",
    "veth;",
    "veth$x",
    "veth1/2",
    "veth1:0",
    "veth012345678901",  # 16 bytes: longer than IFNAMSIZ (16 with its NUL) allows
    "vethé",
    "eth0",  # the container's side of the pair: the gate never looks at it
    "docker0",
    "br-0a1b2c3d4e5f",
    "Veth1",
    "",
    "v",
]


@pytest.mark.parametrize("port", HOSTILE_PORTS)
def test_hostile_port_names_are_refused(port: str) -> None:
    _every_entry_renderer_refuses((port, "10.0.0.1"), "invalid bridge port")


@pytest.mark.parametrize("port", [None, 1, b"veth1", ["veth1"]])
def test_ports_that_are_not_text_are_refused(port: object) -> None:
    _every_entry_renderer_refuses((port, "10.0.0.1"), "invalid bridge port")


@pytest.mark.parametrize(
    "entry",
    [
        "10.0.0.1",  # a bare IP, as the IP-only gate took them
        "v1",  # two characters would unpack into (port, ip)
        ("veth1",),
        ("veth1", "10.0.0.1", "extra"),
        ["veth1", "10.0.0.1"],
        None,
    ],
)
def test_entries_must_be_port_ip_pairs(entry: object) -> None:
    _every_entry_renderer_refuses(entry, "invalid gate entry")


def test_longest_port_name_is_accepted() -> None:
    assert gate.check_port("veth0123456789a") == "veth0123456789a"  # 15 bytes
    assert gate.render_gate_add([("veth0123456789a", "10.0.0.1")]) is not None
