"""The server's mesh pool (pure): subnets given in order and never twice, scopes,
and the join's key and endpoint forms."""

from __future__ import annotations

import base64

import pytest

from segd.config import MeshConfig
from segd.errors import InvalidInput
from segd.server import mesh

POOL = mesh.Pool(MeshConfig(pool="10.213.0.0/22", host_prefix=24))


def test_subnets_are_given_lowest_free_first_until_the_pool_is_exhausted() -> None:
    assert POOL.allocate(set()) == "10.213.0.0/24"
    assert POOL.allocate({"10.213.0.0/24", "10.213.2.0/24"}) == "10.213.1.0/24"
    held = {"10.213.0.0/24", "10.213.1.0/24", "10.213.2.0/24", "10.9.9.0/24"}
    assert POOL.allocate(held) == "10.213.3.0/24"
    assert POOL.allocate(held | {"10.213.3.0/24"}) is None
    assert mesh.Pool(MeshConfig()).allocate(set()) is None


def test_a_huge_pool_allocates_without_walking_it() -> None:
    big = mesh.Pool(MeshConfig(pool="10.0.0.0/8", host_prefix=30))  # 4 million subnets
    assert big.allocate({f"10.0.0.{4 * i}/30" for i in range(50)}) == "10.0.0.200/30"


@pytest.mark.parametrize(
    ("subnet", "held"),
    [
        ("10.213.1.0/24", True),
        ("10.213.1.0/25", False),  # another prefix length than configured
        ("10.214.0.0/24", False),  # outside the pool
        ("", False),
        ("nonsense", False),
    ],
)
def test_holds(subnet: str, held: bool) -> None:
    assert POOL.holds(subnet) is held


def test_scopes() -> None:
    assert POOL.scope_of("h_1", "10.213.3.9") == mesh.MESH_SCOPE
    assert POOL.scope_of("h_1", "172.17.0.2") == "h_1"
    assert POOL.scope_of("h_1", "fd00::1") == "h_1"
    assert mesh.Pool(MeshConfig()).scope_of("h_1", "10.213.3.9") == "h_1"


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("192.0.2.1:51820", "192.0.2.1:51820"),
        ("[2001:DB8::0:1]:51820", "[2001:db8::1]:51820"),
        ("192.0.2.1:00443", "192.0.2.1:443"),
    ],
)
def test_endpoints_are_canonical(text: str, canonical: str) -> None:
    assert mesh.endpoint(text) == canonical


def test_a_wireguard_key_is_32_canonical_bytes() -> None:
    key = base64.b64encode(bytes(range(32))).decode()
    assert mesh.public_key(key) == key
    for bad in (key[:-2] + "B=", key.rstrip("="), "-" * 43 + "=", key + "=="):
        with pytest.raises(InvalidInput, match="public_key"):
            mesh.public_key(bad)
