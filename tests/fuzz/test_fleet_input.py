"""The fleet's new inputs under fuzz: a mesh join's WireGuard key and endpoint,
and a rule side's address blocks. Each is refused with `InvalidInput` or taken
in a canonical form that is taken again unchanged; nothing else escapes."""

from __future__ import annotations

import base64
import ipaddress

from hypothesis import event, given
from hypothesis import strategies as st

from segd import policy
from segd.errors import InvalidInput
from segd.server import mesh
from tests.fuzz import strategies as fz

endpoints = st.one_of(
    st.builds(lambda a, p: f"{a}:{p}", st.ip_addresses(v=4), st.integers(-1, 70_000)),
    st.builds(lambda a, p: f"[{a}]:{p}", st.ip_addresses(v=6), st.integers(-1, 70_000)),
    fz.near(st.just("192.0.2.1:51820")),
    st.sampled_from([*fz.ODD_IPS, "[::1]:1", "1.2.3.4:+1", "1.2.3.4:0x10", "::1:1", "[::1]"]),
    fz.text,
)
keys = st.one_of(
    st.binary(min_size=31, max_size=33).map(lambda b: base64.b64encode(b).decode()),
    fz.near(st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode())),
    fz.text,
)
blocks = st.one_of(
    st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(), st.integers(-1, 130)),
    st.ip_addresses().map(str),
    fz.near(st.just("203.0.113.0/24")),
    st.sampled_from(fz.ODD_IPS),
    fz.text,
)


@fz.fast(400)
@given(text=endpoints)
def test_an_endpoint_is_refused_or_canonical(text: str) -> None:
    try:
        out = mesh.endpoint(text)
    except InvalidInput:
        event("refused")
        return
    event("taken")
    assert mesh.endpoint(out) == out
    host, _, port = out.rpartition(":")
    assert 1 <= int(port) <= 65535
    ipaddress.ip_address(host.strip("[]"))


@fz.fast(300)
@given(text=keys)
def test_a_wireguard_key_is_refused_or_32_bytes(text: str) -> None:
    try:
        out = mesh.public_key(text)
    except InvalidInput:
        event("refused")
        return
    event("taken")
    assert out == text and len(base64.b64decode(out, validate=True)) == 32


@fz.fast(400)
@given(text=blocks)
def test_an_address_block_is_refused_or_canonical(text: str) -> None:
    try:
        out = policy.parse_block(text)
    except InvalidInput:
        event("refused")
        return
    event("taken")
    assert policy.parse_block(out) == out
    net = ipaddress.ip_network(out, strict=True)
    assert policy.sorted_blocks([out]) == [str(net)]


POOL = ipaddress.IPv4Network("10.213.0.0/16")
inside = mesh.matcher(str(POOL))


@fz.fast(600)
@given(
    text=st.one_of(
        st.ip_addresses().map(str),
        st.ip_addresses(v=4, network=str(POOL)).map(str),
        fz.near(st.ip_addresses(v=4, network=str(POOL)).map(str)),
        st.sampled_from(["010.213.0.1", "10.213.1", "10.213.0.1/32", "::ffff:10.213.0.1"]),
        fz.text,
    )
)
def test_the_fast_pool_test_agrees_with_ipaddress(text: str) -> None:
    try:
        want = ipaddress.IPv4Address(text) in POOL
    except ValueError:
        want = False
    assert inside(text) == want
    assert mesh.matcher("")(text) is False
