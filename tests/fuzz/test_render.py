"""`segd.firewall.render` under fuzz: whatever instructions an agent decodes
(any rule id, peer set name, service, address a message could carry), the
renderer raises ValueError or returns a plan in which every line of every
transaction is one of the forms segd emits (`harness.GRAMMAR`): nothing from
the wire reaches nft unescaped.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from segd.firewall import render
from segd.policy import set_name
from segd.wire import WorkloadPolicy
from tests.fuzz import strategies as fz
from tests.fuzz.harness import assert_plan_grammar

SETS = [set_name({"role": "db"}), set_name({"role": "web"}), set_name({})]
NFT_SYNTAX = [
    "} ; flush ruleset",
    "ls_0000000000000000 ; flush ruleset",
    'r1" accept comment "x',
    "r1\nflush ruleset",
    "r1 } table inet x {",
    "@ls_0000000000000000",
    "ls_" + "0" * 15 + "\n",
    "ls_" + "0" * 16 + "\n",
    "r" * 65,
    "\\",
    "$(reboot)",
    "r1\x00",
]
ids = st.one_of(
    st.from_regex(r"r_[0-9a-f]{12}", fullmatch=True),
    st.from_regex(render.RULE_ID_RE.pattern.replace("\\Z", ""), fullmatch=True),
    fz.near(st.just("r_0123456789ab")),
    st.sampled_from(NFT_SYNTAX),
    fz.text,
)
peers = st.one_of(st.none(), st.sampled_from(SETS), fz.near(st.sampled_from(SETS)), ids)
ports = st.one_of(st.integers(0, 70_000), st.sampled_from([-1, 0, 1, 65535, 65536, 2**63]))
services = st.fixed_dictionaries(
    {"proto": st.sampled_from(["tcp", "udp", "icmp"])},
    optional={"port": ports, "port_end": ports},
)
addresses = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(fz.ODD_IPS),
    st.sampled_from(["10.0.0.1 }", "10.0.0.1, 10.0.0.2", "10.0.0.1\n", "::1%lo", "10.0.0.1/8"]),
    fz.near(st.ip_addresses().map(str)),
    fz.text,
)
allows = st.fixed_dictionaries(
    {"rule_id": ids, "peer": peers, "services": st.lists(services, max_size=3)}
)


policies = st.fixed_dictionaries(
    {
        "workload_id": fz.text,
        "container_id": fz.text,
        "labels": st.dictionaries(fz.text, fz.text, max_size=2),
        "ips": st.lists(addresses, max_size=3),
        "inbound": st.lists(allows, max_size=3),
        "outbound": st.lists(allows, max_size=3),
        "mode": st.sampled_from(["full", "visibility", "idle", "Full", ""]),
        "visibility": st.sampled_from(["off", "blocked", "blocked+allowed", "enhanced", "all"]),
    }
)
set_maps = st.dictionaries(
    st.one_of(st.sampled_from(SETS), peers.filter(lambda p: p is not None)),
    st.lists(addresses, max_size=4),
    max_size=4,
)


def _decode(data: dict[str, Any]) -> WorkloadPolicy | None:
    """As the agent gets it: a WorkloadPolicy decoded from JSON, or refused by the decoder."""
    try:
        raw = msgspec.json.encode(data)
    except UnicodeEncodeError:  # a lone surrogate: no JSON message can carry it
        return None
    try:
        return msgspec.json.decode(raw, type=WorkloadPolicy)
    except msgspec.ValidationError:
        return None


def _render_checked(policy: dict[str, Any], sets: dict[str, list[str]], logged: list[str]) -> None:
    wp = _decode(policy)
    if wp is None:
        event("refused by the decoder")
        return
    try:
        plans = [
            render.render_workload(wp, sets, frozenset(logged)),
            render.render_workload(wp, sets, frozenset(logged), was=SETS),
        ]
    except ValueError:
        event("refused by the renderer")
        return
    event("rendered")
    for plan in plans:
        assert_plan_grammar(plan)


@fz.fast(300)
@given(policy=policies, sets=set_maps, logged=st.lists(ids, max_size=2))
def test_any_decoded_policy_renders_to_segd_grammar_or_is_refused(
    policy: dict[str, Any], sets: dict[str, list[str]], logged: list[str]
) -> None:
    _render_checked(policy, sets, logged)


@fz.fast(150)
@given(old=set_maps, new=set_maps, referenced=st.lists(peers.filter(lambda p: p is not None)))
def test_any_set_delta_renders_to_segd_grammar_or_is_refused(
    old: dict[str, list[str]], new: dict[str, list[str]], referenced: list[str]
) -> None:
    try:
        plan = render.render_set_delta(old, new, referenced)
    except ValueError:
        return
    if plan is not None:
        assert_plan_grammar(plan)


@pytest.mark.parametrize("bad", NFT_SYNTAX)
def test_nft_syntax_in_a_rule_id_or_set_name_is_refused(bad: str) -> None:
    for allow in (
        {"rule_id": bad, "peer": None, "services": [{"proto": "tcp", "port": 1, "port_end": 1}]},
        {"rule_id": "r1", "peer": bad, "services": [{"proto": "tcp", "port": 1, "port_end": 1}]},
    ):
        policy = {
            "workload_id": "w",
            "container_id": "c",
            "labels": {},
            "ips": [],
            "inbound": [allow],
            "outbound": [],
        }
        wp = _decode(policy)
        assert wp is not None
        with pytest.raises(ValueError):
            render.render_workload(wp, {})
    with pytest.raises(ValueError):
        render.render_set_delta({}, {SETS[0]: [bad]}, [SETS[0]])


def test_allows_of_one_rule_with_and_without_a_peer_render() -> None:
    svc = {"proto": "tcp", "port": 80, "port_end": 80}
    policy = {
        "workload_id": "w",
        "container_id": "c",
        "labels": {},
        "ips": [],
        "inbound": [
            {"rule_id": "r_000000000001", "peer": None, "services": [svc]},
            {"rule_id": "r_000000000001", "peer": SETS[0], "services": [svc]},
        ],
        "outbound": [],
    }
    wp = _decode(policy)
    assert wp is not None
    assert_plan_grammar(render.render_workload(wp, {SETS[0]: ["10.0.0.1"]}, was=[SETS[1]]))


@pytest.mark.slow
@fz.slow(20_000)
@given(policy=policies, sets=set_maps, logged=st.lists(ids, max_size=2))
def test_any_decoded_policy_renders_to_segd_grammar_or_is_refused_long(
    policy: dict[str, Any], sets: dict[str, list[str]], logged: list[str]
) -> None:
    _render_checked(policy, sets, logged)
