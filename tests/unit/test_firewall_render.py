"""Instructions -> kernel plans for one container namespace: tables of cases."""

from __future__ import annotations

import random
import textwrap

import pytest

from segd.firewall import render
from segd.firewall.plan import Plan
from segd.policy import Service
from segd.wire import Allow, Mode, Rule, VisibilityLevel, WorkloadPolicy

DB = "ls_00000000000000db"
WEB = "ls_0000000000000eb0"

TCP5432 = Service("tcp", 5432, 5432)
UDP53 = Service("udp", 53, 53)
RANGE = Service("tcp", 8000, 8100)
ICMP = Service("icmp")


def _t(text: str) -> str:
    """Expected text written with 4-space indents; nft text uses tabs."""
    lines = textwrap.dedent(text).strip("\n").splitlines()
    out = []
    for line in lines:
        stripped = line.lstrip(" ")
        out.append("\t" * ((len(line) - len(stripped)) // 4) + stripped)
    return "\n".join(out) + "\n"


def pol(
    inbound: list[Allow] | None = None,
    outbound: list[Allow] | None = None,
    mode: Mode = "full",
    visibility: VisibilityLevel = "off",
) -> WorkloadPolicy:
    return WorkloadPolicy(
        workload_id="w1",
        container_id="c1",
        labels={"role": "db"},
        ips=["10.213.0.2"],
        inbound=inbound or [],
        outbound=outbound or [],
        mode=mode,
        visibility=visibility,
    )


LOG_R1 = 'log group 7 prefix "segd:in:a:r1"'
BASE = [
    "ct state established,related accept",
    "ct state invalid drop",
]
ND_IN = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept"
ND_OUT = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept"


def _rules(text: str) -> list[str]:
    return [f"\t\t{line.strip()}" for line in text.strip().splitlines()]


def table(sets: list[str] | None = None, inbound: str = "", outbound: str = "") -> str:
    """The expected table: fixed head and base rules around the case's own lines."""
    lines = ["add table inet segd", "delete table inet segd", "table inet segd {"]
    lines += sets or []
    lines += ["\tchain input {", "\t\ttype filter hook input priority filter; policy drop;"]
    lines += _rules("\n".join(['iif "lo" accept', *BASE, ND_IN])) + _rules(inbound)
    lines += [
        "\t}",
        "\tchain output {",
        "\t\ttype filter hook output priority filter; policy drop;",
    ]
    lines += _rules("\n".join(['oif "lo" accept', *BASE, ND_OUT])) + _rules(outbound)
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


def _sets(name: str, v4: str = "", v6: str = "") -> list[str]:
    out = []
    for fam, elems in (("v4", v4), ("v6", v6)):
        out += [f"\tset {name}_{fam} {{", f"\t\ttype ip{fam}_addr"]
        out += [f"\t\telements = {{ {elems} }}"] if elems else []
        out += ["\t}"]
    return out


CASES: list[tuple[str, WorkloadPolicy, dict[str, list[str]], frozenset[str], str]] = [
    ("no allows: only the base rules", pol(), {}, frozenset(), table()),
    (
        "inbound tcp from a peer set, both families",
        pol(inbound=[Allow("r1", DB, [TCP5432])]),
        {DB: ["10.213.0.9", "fd10:213::9", "10.213.0.10"]},
        frozenset(),
        table(
            sets=_sets(DB, "10.213.0.9, 10.213.0.10", "fd10:213::9"),
            inbound=f"""
                ip saddr @{DB}_v4 tcp dport 5432 accept comment "r1"
                ip6 saddr @{DB}_v6 tcp dport 5432 accept comment "r1"
            """,
        ),
    ),
    (
        "any peer: one rule per service covers both families, icmp per family",
        pol(inbound=[Allow("r2", None, [UDP53, RANGE, ICMP])]),
        {},
        frozenset(),
        table(
            inbound="""
                meta l4proto icmp accept comment "r2"
                meta l4proto ipv6-icmp accept comment "r2"
                tcp dport 8000-8100 accept comment "r2"
                udp dport 53 accept comment "r2"
            """,
        ),
    ),
    (
        "outbound uses daddr in the output chain",
        pol(outbound=[Allow("r3", WEB, [ICMP, UDP53])]),
        {WEB: ["10.213.0.3"]},
        frozenset(),
        table(
            sets=_sets(WEB, "10.213.0.3"),
            outbound=f"""
                ip daddr @{WEB}_v4 meta l4proto icmp accept comment "r3"
                ip6 daddr @{WEB}_v6 meta l4proto ipv6-icmp accept comment "r3"
                ip daddr @{WEB}_v4 udp dport 53 accept comment "r3"
                ip6 daddr @{WEB}_v6 udp dport 53 accept comment "r3"
            """,
        ),
    ),
    (
        "log option logs to NFLOG (works in a container namespace) before accepting, "
        "only for that rule",
        pol(inbound=[Allow("r1", DB, [TCP5432]), Allow("r2", None, [UDP53])]),
        {DB: []},
        frozenset({"r1"}),
        table(
            sets=_sets(DB),
            inbound=f"""
                ip saddr @{DB}_v4 tcp dport 5432 {LOG_R1} accept comment "r1"
                ip6 saddr @{DB}_v6 tcp dport 5432 {LOG_R1} accept comment "r1"
                udp dport 53 accept comment "r2"
            """,
        ),
    ),
    (
        "level blocked: each chain's drops are logged, rate-limited, before the policy drop",
        pol(inbound=[Allow("r2", None, [UDP53])], visibility="blocked"),
        {},
        frozenset(),
        table(
            inbound="""
                udp dport 53 accept comment "r2"
                limit rate 100/second burst 200 packets log group 7 prefix "segd:in:b"
            """,
            outbound="""
                limit rate 100/second burst 200 packets log group 7 prefix "segd:out:b"
            """,
        ),
    ),
    (
        "level blocked+allowed: every accept is logged with its rule id",
        pol(inbound=[Allow("r2", None, [UDP53])], visibility="blocked+allowed"),
        {},
        frozenset(),
        table(
            inbound="""
                udp dport 53 log group 7 prefix "segd:in:a:r2" accept comment "r2"
                limit rate 100/second burst 200 packets log group 7 prefix "segd:in:b"
            """,
            outbound="""
                limit rate 100/second burst 200 packets log group 7 prefix "segd:out:b"
            """,
        ),
    ),
    (
        "visibility mode: what would be dropped is logged as potentially blocked and accepted",
        pol(inbound=[Allow("r2", None, [UDP53])], mode="visibility", visibility="enhanced"),
        {},
        frozenset(),
        table(
            inbound="""
                udp dport 53 log group 7 prefix "segd:in:a:r2" accept comment "r2"
                limit rate 100/second burst 200 packets log group 7 prefix "segd:in:p"
                accept
            """,
            outbound="""
                limit rate 100/second burst 200 packets log group 7 prefix "segd:out:p"
                accept
            """,
        ),
    ),
    (
        "visibility mode at level off: accepts what it would drop, logs nothing",
        pol(mode="visibility"),
        {},
        frozenset(),
        table(inbound="accept", outbound="accept"),
    ),
    (
        "a referenced set missing from the instructions renders empty",
        pol(inbound=[Allow("r1", DB, [TCP5432])], outbound=[Allow("r9", WEB, [TCP5432])]),
        {WEB: ["fd10:213::1"]},
        frozenset(),
        table(
            sets=_sets(DB) + _sets(WEB, v6="fd10:213::1"),
            inbound=f"""
                ip saddr @{DB}_v4 tcp dport 5432 accept comment "r1"
                ip6 saddr @{DB}_v6 tcp dport 5432 accept comment "r1"
            """,
            outbound=f"""
                ip daddr @{WEB}_v4 tcp dport 5432 accept comment "r9"
                ip6 daddr @{WEB}_v6 tcp dport 5432 accept comment "r9"
            """,
        ),
    ),
]


@pytest.mark.parametrize(
    ("policy", "sets", "logs", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_workload_script(
    policy: WorkloadPolicy, sets: dict[str, list[str]], logs: frozenset[str], expected: str
) -> None:
    assert render.workload_script(policy, sets, logs) == expected


DROP_SHADOW = "add table inet segd_shadow\ndelete table inet segd_shadow\n"


def shadowed(script: str) -> tuple[str, str, str]:
    """A whole-table replace script behind its shadow: the three transactions."""
    body = script.split("table inet segd {\n", 1)[1]
    return (DROP_SHADOW, "table inet segd_shadow {\n" + body + script, DROP_SHADOW)


@pytest.mark.parametrize(
    ("policy", "sets", "logs", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_an_unknown_table_is_replaced_behind_a_shadow(
    policy: WorkloadPolicy, sets: dict[str, list[str]], logs: frozenset[str], expected: str
) -> None:
    counts = policy.visibility == "enhanced"  # a table in every mode these cases use
    assert render.render_workload(policy, sets, logs) == Plan(
        "workload_replace", shadowed(expected), counts=counts
    )


def test_only_referenced_sets_are_rendered() -> None:
    p = pol(inbound=[Allow("r1", DB, [TCP5432])])
    for text in (
        render.render_workload(p, {WEB: ["1.2.3.4"]}).text,
        render.render_workload(p, {WEB: ["1.2.3.4"]}, was=set()).text,
    ):
        assert WEB not in text
        assert "1.2.3.4" not in text


def test_render_is_deterministic_whatever_the_input_order() -> None:
    allows = [
        Allow("r1", DB, [TCP5432, UDP53]),
        Allow("r2", WEB, [ICMP]),
        Allow("r3", None, [RANGE]),
    ]
    members = [f"10.213.0.{i}" for i in range(1, 60)] + ["fd10:213::5", "fd10:213::1"]
    expected = render.render_workload(
        pol(allows, allows), {DB: members, WEB: members[:3]}, was=[WEB, DB]
    )
    rng = random.Random(7)
    for _ in range(20):
        shuffled = [
            Allow(a.rule_id, a.peer, rng.sample(a.services, len(a.services))) for a in allows
        ]
        rng.shuffle(shuffled)
        m = members + rng.sample(members, 10)  # duplicates too
        rng.shuffle(m)
        got = render.render_workload(
            pol(shuffled, shuffled[::-1]), {WEB: members[:3], DB: m}, was=[DB, WEB, DB]
        )
        assert got == expected


def test_addresses_are_normalised() -> None:
    p = pol(inbound=[Allow("r1", DB, [TCP5432])])
    members = {DB: ["FD10:0213:0000::0001", "10.213.0.1"]}
    text = render.workload_script(p, members)
    assert "elements = { fd10:213::1 }" in text
    assert "elements = { 10.213.0.1 }" in text
    in_place = render.render_workload(p, members, was=[]).txs[0]
    assert f"add element inet segd {DB}_v6 {{ fd10:213::1 }}" in in_place
    assert f"add element inet segd {DB}_v4 {{ 10.213.0.1 }}" in in_place


ISOLATION = _t(
    """
    add table inet segd
    delete table inet segd
    table inet segd {
        chain input {
            type filter hook input priority filter; policy drop;
            iif "lo" accept
            limit rate 100/second burst 200 packets log group 7 prefix "segd:in:b"
        }
        chain output {
            type filter hook output priority filter; policy drop;
            oif "lo" accept
            limit rate 100/second burst 200 packets log group 7 prefix "segd:out:b"
        }
    }
    """
)


def test_isolation_of_an_unknown_table_is_a_shadowed_replace() -> None:
    assert render.render_isolation() == Plan("isolation_replace", shadowed(ISOLATION))


def test_removal_takes_the_shadow_too() -> None:
    assert render.render_removal() == Plan(
        "removal",
        (
            "add table inet segd\ndelete table inet segd\n"
            "add table inet segd_shadow\ndelete table inet segd_shadow\n",
        ),
    )


# ---- rewriting a known table in place ---------------------------------------------------

SKELETON_CHAINS = [
    "\tchain input {",
    "\t\ttype filter hook input priority filter; policy drop;",
    "\t}",
    "\tchain output {",
    "\t\ttype filter hook output priority filter; policy drop;",
    "\t}",
]
HEAD = ["flush table inet segd", "add table inet segd_shadow", "delete table inet segd_shadow"]
BASE_IN = [
    'add rule inet segd input iif "lo" accept',
    "add rule inet segd input ct state established,related accept",
    "add rule inet segd input ct state invalid drop",
    f"add rule inet segd input {ND_IN}",
]
BASE_OUT = [
    'add rule inet segd output oif "lo" accept',
    "add rule inet segd output ct state established,related accept",
    "add rule inet segd output ct state invalid drop",
    f"add rule inet segd output {ND_OUT}",
]


def declared(*peers: str) -> list[str]:
    """The skeleton's empty set declarations for these peer sets."""
    out = []
    for peer in peers:
        for fam in ("v4", "v6"):
            out += [f"\tset {peer}_{fam} {{", f"\t\ttype ip{fam}_addr", "\t}"]
    return out


def in_place(decl: list[str], lines: list[str]) -> str:
    return "\n".join(["table inet segd {", *decl, *SKELETON_CHAINS, "}", *HEAD, *lines]) + "\n"


DB_IN = pol(inbound=[Allow("r1", DB, [TCP5432])])
WEB_OUT = pol(outbound=[Allow("r2", WEB, [UDP53])])
BOTH = pol(inbound=DB_IN.inbound, outbound=WEB_OUT.outbound)

IN_PLACE: list[tuple[str, WorkloadPolicy | None, dict[str, list[str]], list[str], str]] = [
    (
        "isolation -> workload: sets declared and filled, rules added",
        DB_IN,
        {DB: ["10.213.0.9", "fd10:213::9"]},
        [],
        in_place(
            declared(DB),
            [
                f"flush set inet segd {DB}_v4",
                f"add element inet segd {DB}_v4 {{ 10.213.0.9 }}",
                f"flush set inet segd {DB}_v6",
                f"add element inet segd {DB}_v6 {{ fd10:213::9 }}",
                *BASE_IN,
                f'add rule inet segd input ip saddr @{DB}_v4 tcp dport 5432 accept comment "r1"',
                f'add rule inet segd input ip6 saddr @{DB}_v6 tcp dport 5432 accept comment "r1"',
                *BASE_OUT,
            ],
        ),
    ),
    (
        "a peer set no longer referenced is dropped, whether or not it is there",
        WEB_OUT,
        {WEB: ["10.213.0.3"], DB: ["10.213.0.9"]},
        [DB],
        in_place(
            declared(WEB),
            [
                f"add set inet segd {DB}_v4 {{ type ipv4_addr; }}",
                f"delete set inet segd {DB}_v4",
                f"add set inet segd {DB}_v6 {{ type ipv6_addr; }}",
                f"delete set inet segd {DB}_v6",
                f"flush set inet segd {WEB}_v4",
                f"add element inet segd {WEB}_v4 {{ 10.213.0.3 }}",
                f"flush set inet segd {WEB}_v6",
                *BASE_IN,
                *BASE_OUT,
                f'add rule inet segd output ip daddr @{WEB}_v4 udp dport 53 accept comment "r2"',
                f'add rule inet segd output ip6 daddr @{WEB}_v6 udp dport 53 accept comment "r2"',
            ],
        ),
    ),
    (
        "a peer set still referenced is kept and refilled, not dropped",
        BOTH,
        {},
        [WEB],
        in_place(
            declared(DB, WEB),
            [
                f"flush set inet segd {DB}_v4",
                f"flush set inet segd {DB}_v6",
                f"flush set inet segd {WEB}_v4",
                f"flush set inet segd {WEB}_v6",
                *BASE_IN,
                f'add rule inet segd input ip saddr @{DB}_v4 tcp dport 5432 accept comment "r1"',
                f'add rule inet segd input ip6 saddr @{DB}_v6 tcp dport 5432 accept comment "r1"',
                *BASE_OUT,
                f'add rule inet segd output ip daddr @{WEB}_v4 udp dport 53 accept comment "r2"',
                f'add rule inet segd output ip6 daddr @{WEB}_v6 udp dport 53 accept comment "r2"',
            ],
        ),
    ),
    (
        "workload -> isolation: every peer set dropped",
        None,
        {},
        [WEB, DB],
        in_place(
            [],
            [
                f"add set inet segd {DB}_v4 {{ type ipv4_addr; }}",
                f"delete set inet segd {DB}_v4",
                f"add set inet segd {DB}_v6 {{ type ipv6_addr; }}",
                f"delete set inet segd {DB}_v6",
                f"add set inet segd {WEB}_v4 {{ type ipv4_addr; }}",
                f"delete set inet segd {WEB}_v4",
                f"add set inet segd {WEB}_v6 {{ type ipv6_addr; }}",
                f"delete set inet segd {WEB}_v6",
                'add rule inet segd input iif "lo" accept',
                "add rule inet segd input limit rate 100/second burst 200 packets"
                ' log group 7 prefix "segd:in:b"',
                'add rule inet segd output oif "lo" accept',
                "add rule inet segd output limit rate 100/second burst 200 packets"
                ' log group 7 prefix "segd:out:b"',
            ],
        ),
    ),
]


@pytest.mark.parametrize(
    ("policy", "sets", "was", "expected"),
    [c[1:] for c in IN_PLACE],
    ids=[c[0] for c in IN_PLACE],
)
def test_a_known_table_is_rewritten_in_place_with_the_replace_as_fallback(
    policy: WorkloadPolicy | None, sets: dict[str, list[str]], was: list[str], expected: str
) -> None:
    if policy is None:
        plan = render.render_isolation(was=was)
        assert plan == Plan("isolation", (expected,), render.render_isolation())
    else:
        plan = render.render_workload(policy, sets, was=was)
        fallback = render.render_workload(policy, sets)
        counts = policy.visibility == "enhanced"
        assert plan == Plan("workload", (expected,), fallback, counts=counts)


@pytest.mark.parametrize("name", ["ls_00000000000000DB", "x } ; flush ruleset", ""])
def test_hostile_names_in_was_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid set name"):
        render.render_workload(DB_IN, {}, was=[name])
    with pytest.raises(ValueError, match="invalid set name"):
        render.render_isolation(was=[name])


# ---- validation -------------------------------------------------------------------------

HOSTILE_IPS = [
    "1.2.3.4 } ; flush ruleset",
    "1.2.3.4, 5.6.7.8",
    "10.0.0.0/8",
    "fe80::1%eth0",
    "fe80::1%0 } ; flush ruleset",
    "",
    " 1.2.3.4",
    "1.2.3.4\n",
    "example.com",
    "1.2.3",
    "010.213.0.1",  # leading zeros: octal to some parsers
]


@pytest.mark.parametrize("ip", HOSTILE_IPS)
def test_hostile_ips_are_refused(ip: str) -> None:
    with pytest.raises(ValueError, match="invalid IP address"):
        render.render_workload(pol(inbound=[Allow("r1", DB, [TCP5432])]), {DB: [ip]})


HOSTILE_SETS = [
    "ls_00000000000000db_v4 } ; flush ruleset ; set x {",
    "ls_00000000000000DB",
    "ls_00000000000000d",
    "ls_00000000000000dbb",
    "ls_00000000000000db\n",
    "@ls_00000000000000db",
    "set",
    "",
]


@pytest.mark.parametrize("name", HOSTILE_SETS)
def test_hostile_set_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid set name"):
        render.render_workload(pol(inbound=[Allow("r1", name, [TCP5432])]), {})
    with pytest.raises(ValueError, match="invalid set name"):
        render.render_set_delta({}, {name: ["1.2.3.4"]}, {name})


HOSTILE_RULE_IDS = [
    'r1" accept ; flush ruleset ; #',
    "r 1",
    "r1\n",
    "",
    "x" * 65,
    "règle",
]


@pytest.mark.parametrize("rule_id", HOSTILE_RULE_IDS)
def test_hostile_rule_ids_are_refused(rule_id: str) -> None:
    with pytest.raises(ValueError, match="invalid rule id"):
        render.render_workload(pol(outbound=[Allow(rule_id, None, [UDP53])]), {})


@pytest.mark.parametrize(
    "svc",
    [
        Service("tcp", 0, 0),
        Service("tcp", 70000, 70000),
        Service("udp", 100, 50),
        Service("sctp", 1, 1),  # type: ignore[arg-type]
        Service("tcp", True, True),
    ],
    ids=["port 0", "port too big", "reversed range", "unknown proto", "bool port"],
)
def test_bad_services_are_refused(svc: Service) -> None:
    with pytest.raises(ValueError, match="invalid"):
        render.render_workload(pol(inbound=[Allow("r1", None, [svc])]), {})


# ---- membership deltas ------------------------------------------------------------------

DELTAS: list[tuple[str, dict[str, list[str]], dict[str, list[str]], set[str], str | None]] = [
    ("nothing changed", {DB: ["10.0.0.1"]}, {DB: ["10.0.0.1"]}, {DB}, None),
    ("no sets at all", {}, {}, set(), None),
    (
        "one peer joins",
        {DB: ["10.0.0.1"]},
        {DB: ["10.0.0.2", "10.0.0.1"]},
        {DB},
        f"add element inet segd {DB}_v4 {{ 10.0.0.2 }}\n",
    ),
    (
        "one peer leaves, one joins, both families, deletes first",
        {DB: ["10.0.0.1", "fd10::1"]},
        {DB: ["10.0.0.2", "fd10::2", "fd10::3"]},
        {DB},
        f"delete element inet segd {DB}_v4 {{ 10.0.0.1 }}\n"
        f"delete element inet segd {DB}_v6 {{ fd10::1 }}\n"
        f"add element inet segd {DB}_v4 {{ 10.0.0.2 }}\n"
        f"add element inet segd {DB}_v6 {{ fd10::2, fd10::3 }}\n",
    ),
    (
        "unreferenced sets are ignored",
        {DB: ["10.0.0.1"], WEB: ["10.0.0.7"]},
        {DB: ["10.0.0.1"], WEB: []},
        {DB},
        None,
    ),
    (
        "a set missing on one side counts as empty",
        {},
        {WEB: ["10.0.0.9", "10.0.0.8"]},
        {WEB},
        f"add element inet segd {WEB}_v4 {{ 10.0.0.8, 10.0.0.9 }}\n",
    ),
    (
        "spelling differences are not changes",
        {DB: ["fd10:0::1"]},
        {DB: ["FD10::1"]},
        {DB},
        None,
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "referenced", "expected"), [d[1:] for d in DELTAS], ids=[d[0] for d in DELTAS]
)
def test_render_set_delta(
    old: dict[str, list[str]],
    new: dict[str, list[str]],
    referenced: set[str],
    expected: str | None,
) -> None:
    want = None if expected is None else Plan("set_delta", (expected,))
    assert render.render_set_delta(old, new, referenced) == want


def test_delta_refuses_hostile_addresses() -> None:
    with pytest.raises(ValueError, match="invalid IP address"):
        render.render_set_delta({}, {DB: ["1.2.3.4 } ; flush ruleset"]}, {DB})


# ---- connection counts -----------------------------------------------------------------

COUNTS: list[tuple[Mode, VisibilityLevel, bool]] = [
    ("full", "enhanced", True),
    ("visibility", "enhanced", True),
    ("idle", "enhanced", False),  # no table: nothing to count in
    ("full", "blocked+allowed", False),
    ("full", "blocked", False),
    ("visibility", "off", False),
]


@pytest.mark.parametrize(("mode", "level", "counts"), COUNTS)
def test_a_workload_at_level_enhanced_counts_its_connections(
    mode: Mode, level: VisibilityLevel, counts: bool
) -> None:
    p = pol(inbound=[Allow("r1", DB, [TCP5432])], mode=mode, visibility=level)
    for was in (None, [DB]):
        plan = render.render_workload(p, {}, was=was)
        assert plan.counts is counts
        assert plan.fallback is None or plan.fallback.counts is counts


def test_isolation_removal_and_set_deltas_never_count() -> None:
    tables = [render.render_isolation(), render.render_isolation(was=[]), render.render_removal()]
    delta = render.render_set_delta({}, {DB: ["10.0.0.1"]}, {DB})
    assert delta is not None
    assert [p.counts for p in [*tables, delta]] == [False] * 4
    # a whole-table plan says whether to count; a set delta leaves it as it is
    assert {p.what for p in tables} <= render.TABLE_PLANS
    assert delta.what not in render.TABLE_PLANS


# ---- structure key ----------------------------------------------------------------------


def test_structure_key_ignores_membership_only() -> None:
    p = pol(inbound=[Allow("r1", DB, [TCP5432])])
    assert render.set_structure_key(p) == render.set_structure_key(
        pol(inbound=[Allow("r1", DB, [TCP5432])])
    )
    assert "elements" not in render.set_structure_key(p)
    changed = [
        pol(inbound=[Allow("r1", DB, [TCP5432, UDP53])]),
        pol(inbound=[Allow("r1", WEB, [TCP5432])]),
        pol(outbound=[Allow("r1", DB, [TCP5432])]),
        pol(inbound=[Allow("r2", DB, [TCP5432])]),
    ]
    for other in changed:
        assert render.set_structure_key(other) != render.set_structure_key(p)
    assert render.set_structure_key(p, frozenset({"r1"})) != render.set_structure_key(p)


def test_referenced_sets() -> None:
    p = pol(inbound=[Allow("r1", DB, [TCP5432]), Allow("r2", None, [UDP53])])
    p = pol(inbound=p.inbound, outbound=[Allow("r3", WEB, [ICMP])])
    assert render.referenced_sets(p) == {DB, WEB}


def test_log_rules_from_instruction_rules() -> None:
    rules = [
        Rule("r1", "any", "any", ["tcp/1"], options=["log"]),
        Rule("r2", "any", "any", ["tcp/2"]),
    ]
    assert render.log_rules(rules) == frozenset({"r1"})


# ---- address blocks (ip: peers) --------------------------------------------------------

EXT = "ip_0000000000000e71"


def test_a_set_of_address_blocks_is_an_interval_set() -> None:
    p = pol(inbound=[Allow("r1", EXT, [TCP5432])])
    blocks = {EXT: ["203.0.113.0/24", "2001:db8::/32", "198.51.100.7/32"]}
    text = render.workload_script(p, blocks)
    assert (
        _t(
            """
        set ip_0000000000000e71_v4 {
            type ipv4_addr
            flags interval
            elements = { 198.51.100.7/32, 203.0.113.0/24 }
        }
        set ip_0000000000000e71_v6 {
            type ipv6_addr
            flags interval
            elements = { 2001:db8::/32 }
        }
        """
        ).replace("\n", "\n\t")
        in "\t" + text
    )
    assert f"ip saddr @{EXT}_v4 tcp dport 5432 accept" in text
    in_place = render.render_workload(p, blocks, was=[EXT]).txs[0]
    assert f"add element inet segd {EXT}_v4 {{ 198.51.100.7/32, 203.0.113.0/24 }}" in in_place
    # a set of addresses stays a plain set
    assert "flags interval" not in render.workload_script(
        pol(inbound=[Allow("r1", DB, [TCP5432])]), {DB: ["10.0.0.1"]}
    )


def test_overlapping_blocks_are_merged_for_the_interval_set() -> None:
    p = pol(inbound=[Allow("r1", EXT, [TCP5432])])
    text = render.workload_script(p, {EXT: ["10.0.0.0/8", "10.1.0.0/16", "12.0.0.0/8"]})
    assert "elements = { 10.0.0.0/8, 12.0.0.0/8 }" in text


def test_an_interval_set_no_longer_referenced_is_dropped_as_one() -> None:
    text = render.render_workload(pol(inbound=[Allow("r1", DB, [TCP5432])]), {}, was=[EXT]).txs[0]
    assert f"add set inet segd {EXT}_v4 {{ type ipv4_addr; flags interval; }}" in text
    assert f"delete set inet segd {EXT}_v4" in text


@pytest.mark.parametrize(
    "block",
    ["10.0.0.1/8", "10.0.0.1", "10.0.0.0/33", "fe80::/10%eth0", "x/8", "", "10.0.0.0/8 }"],
)
def test_bad_blocks_are_refused(block: str) -> None:
    with pytest.raises(ValueError, match="invalid address block"):
        render.render_workload(pol(inbound=[Allow("r1", EXT, [TCP5432])]), {EXT: [block]})
    with pytest.raises(ValueError, match="invalid address block"):
        render.check_set(EXT, [block])


def test_a_block_in_a_set_of_addresses_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid IP address"):
        render.check_set(DB, ["10.0.0.0/8"])
    render.check_set(DB, ["10.0.0.1"])
    render.check_set(EXT, ["10.0.0.0/8"])
