"""The segd mesh's pure cores: keys, the UAPI protocol, the WireGuard choice, the
host's desired state and the Docker network (tables of cases)."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from segd import wire
from segd.errors import InvalidInput
from segd.mesh import choice, keys, network, plan, uapi
from segd.mesh.uapi import Peer

K1 = keys.from_private(bytes(range(32)))
K2 = keys.from_private(bytes(range(1, 33)))
K3 = keys.from_private(bytes(range(2, 34)))
LOCAL = plan.Local("segd-wg", "br-0123456789ab", "10.213.1.1")


def mesh(*peers: wire.MeshPeer, pool: str = "10.213.0.0/16") -> wire.Mesh:
    return wire.Mesh(pool=pool, subnet="10.213.1.0/24", peers=list(peers))


def peer(
    host: str, key: keys.KeyPair, subnet: str, endpoint: str = "10.0.0.2:51820"
) -> wire.MeshPeer:
    return wire.MeshPeer(host_id=host, public_key=key.public_b64, endpoint=endpoint, subnet=subnet)


# ---- keys -------------------------------------------------------------------------------


def test_key_pair_is_made_once_0600_and_loaded_again(tmp_path: Path) -> None:
    first = keys.load_or_create(tmp_path)
    path = tmp_path / keys.KEY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes() == first.private
    assert keys.load_or_create(tmp_path) == first
    assert len(base64.b64decode(first.public_b64)) == 32 and len(first.public_b64) == 44


def test_a_corrupt_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / keys.KEY_FILE).write_bytes(b"short")
    with pytest.raises(InvalidInput, match="corrupt"):
        keys.load_or_create(tmp_path)


@pytest.mark.parametrize(
    "text", ["", "abc", "A" * 44, base64.b64encode(b"x" * 31).decode(), K1.public_b64 + "\n"]
)
def test_bad_public_keys_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput):
        keys.decode_public(text)


# ---- uapi -------------------------------------------------------------------------------


def test_set_request_replaces_peers_with_hex_keys() -> None:
    p = Peer(K2.public, "10.250.0.12:51820", ("10.213.2.0/24",))
    got = uapi.set_request(K1.private, 51820, [p]).decode()
    assert got == (
        f"set=1\nprivate_key={K1.private.hex()}\nlisten_port=51820\nreplace_peers=true\n"
        f"public_key={K2.public.hex()}\nendpoint=10.250.0.12:51820\n"
        "persistent_keepalive_interval=25\nreplace_allowed_ips=true\n"
        "allowed_ip=10.213.2.0/24\n\n"
    )


def test_set_request_with_no_peers_removes_them_all() -> None:
    assert uapi.set_request(K1.private, 1, []).endswith(b"replace_peers=true\n\n")


def test_get_answer_is_parsed() -> None:
    answer = (
        f"private_key={K1.private.hex()}\nlisten_port=51820\n"
        f"public_key={K3.public.hex()}\nendpoint=10.250.0.13:51820\n"
        "last_handshake_time_sec=0\nallowed_ip=10.213.3.0/24\n"
        f"public_key={K2.public.hex()}\nendpoint=10.250.0.12:51820\n"
        "persistent_keepalive_interval=25\nlast_handshake_time_sec=1700000000\n"
        "allowed_ip=10.213.2.0/24\nallowed_ip=10.213.9.0/24\nerrno=0\n\n"
    ).encode()
    dev = uapi.parse_get(answer)
    assert dev.private_key == K1.private and dev.listen_port == 51820
    assert dev.peers == tuple(
        sorted(
            [
                Peer(K3.public, "10.250.0.13:51820", ("10.213.3.0/24",), 0),
                Peer(K2.public, "10.250.0.12:51820", ("10.213.2.0/24", "10.213.9.0/24"), 25),
            ]
        )
    )
    assert dev.handshakes == {K3.public: 0, K2.public: 1700000000}


@pytest.mark.parametrize(
    ("answer", "errno"),
    [(b"errno=22\n\n", 22), (b"errno=0\n\n", 0), (b"errno=-1\n\n", -1)],
)
def test_errno_is_read(answer: bytes, errno: int) -> None:
    if errno == 0:
        uapi.check_errno(answer)
        return
    with pytest.raises(uapi.UapiError) as e:
        uapi.check_errno(answer)
    assert e.value.errno == errno


@pytest.mark.parametrize(
    "answer",
    [b"", b"\n\n", b"listen_port=1\n\n", b"nonsense\nerrno=0\n\n", b"errno=x\n\n", b"\xff"],
)
def test_unreadable_answers_raise(answer: bytes) -> None:
    with pytest.raises(uapi.UapiError):
        uapi.parse_get(answer)


def test_uapi_lines_cannot_be_smuggled() -> None:
    bad = Peer(K2.public, "10.0.0.1:1\nprivate_key=00", ("10.213.2.0/24",))
    with pytest.raises(InvalidInput):
        uapi.set_request(K1.private, 1, [bad])


# ---- which WireGuard --------------------------------------------------------------------

CHOICES = [
    ("auto", True, None, "kernel"),
    ("auto", True, "/usr/bin/wireguard-go", "kernel"),
    ("auto", False, "/usr/bin/wireguard-go", "userspace"),
    ("kernel", True, None, "kernel"),
    ("userspace", True, "/usr/bin/wireguard-go", "userspace"),
    ("auto", False, None, "none: this kernel has no WireGuard and wireguard-go is not installed"),
    ("kernel", False, "/usr/bin/wireguard-go", 'none: wireguard = "kernel": this kernel has no'),
    ("userspace", True, None, "none: wireguard-go is not installed"),
]


@pytest.mark.parametrize(("setting", "kernel", "go", "want"), CHOICES)
def test_wireguard_choice(setting: choice.Setting, kernel: bool, go: str | None, want: str) -> None:
    if want.startswith("none"):
        with pytest.raises(choice.NoWireGuard):
            choice.choose(setting, kernel, go)
        assert choice.describe(setting, kernel, go).startswith(want)
    else:
        assert choice.choose(setting, kernel, go) == want


# ---- the desired state ------------------------------------------------------------------


def test_peers_and_routes_come_from_the_mesh() -> None:
    d = plan.desired(
        mesh(peer("h3", K3, "10.213.3.0/24", "10.250.0.13:51820"), peer("h2", K2, "10.213.2.0/24")),
        LOCAL,
        K1.public,
    )
    assert d.routes == ("10.213.2.0/24", "10.213.3.0/24")
    assert d.peers == tuple(
        sorted(
            [
                Peer(K2.public, "10.0.0.2:51820", ("10.213.2.0/24",)),
                Peer(K3.public, "10.250.0.13:51820", ("10.213.3.0/24",)),
            ]
        )
    )
    assert d.skipped == ()


BAD_PEERS = [
    ("bad key", wire.MeshPeer("h", "x" * 44, "10.0.0.2:51820", "10.213.2.0/24"), "public key"),
    ("outside the pool", peer("h", K2, "10.99.2.0/24"), "not inside the pool"),
    ("the whole pool", peer("h", K2, "10.213.0.0/16"), "not inside the pool"),
    ("our own subnet", peer("h", K2, "10.213.1.0/24"), "overlaps"),
    ("covering our subnet", peer("h", K2, "10.213.0.0/23"), "overlaps"),
    ("our own key", peer("h", K1, "10.213.2.0/24"), "used twice"),
    ("no port", peer("h", K2, "10.213.2.0/24", "10.0.0.2"), "endpoint"),
    ("hostname endpoint", peer("h", K2, "10.213.2.0/24", "example.org:51820"), "endpoint"),
    ("IPv6 unbracketed", peer("h", K2, "10.213.2.0/24", "fd00::1:51820"), "endpoint"),
    ("IPv6 subnet", peer("h", K2, "fd00::/64"), "not inside the pool"),
]


@pytest.mark.parametrize(("bad", "why"), [b[1:] for b in BAD_PEERS], ids=[b[0] for b in BAD_PEERS])
def test_unusable_peers_are_left_out_with_the_reason(bad: wire.MeshPeer, why: str) -> None:
    good = peer("good", K3, "10.213.3.0/24")
    d = plan.desired(mesh(bad, good), LOCAL, K1.public)
    assert d.routes == ("10.213.3.0/24",)
    assert len(d.skipped) == 1 and why in d.skipped[0], d.skipped


def test_two_peers_claiming_one_subnet_keep_only_the_first() -> None:
    d = plan.desired(mesh(peer("a", K2, "10.213.2.0/24"), peer("b", K3, "10.213.2.0/24")), LOCAL)
    assert [p.public_key for p in d.peers] == [K2.public]


@pytest.mark.parametrize(
    ("pool", "subnet", "local"),
    [
        ("fd00::/48", "fd00::/64", LOCAL),
        ("10.213.0.0/16", "10.99.0.0/24", LOCAL),
        ("10.213.0.0/16", "10.213.1.0/24", plan.Local("segd-wg", "br0", "10.213.2.1")),
        ("10.213.0.0/16", "10.213.1.0/24", plan.Local("segd wg", "br0", "10.213.1.1")),
        ("10.213.0.0/16", "10.213.1.0/24", plan.Local("segd-wg", "a" * 16, "10.213.1.1")),
        ("nonsense", "10.213.1.0/24", LOCAL),
    ],
)
def test_an_unusable_pool_subnet_or_local_side_applies_nothing(
    pool: str, subnet: str, local: plan.Local
) -> None:
    with pytest.raises(InvalidInput):
        plan.desired(wire.Mesh(pool=pool, subnet=subnet, peers=[]), local)


def test_host_table_keeps_pool_traffic_on_the_interface() -> None:
    d = plan.desired(mesh(peer("h2", K2, "10.213.2.0/24")), LOCAL)
    (text,) = plan.render_table(d).txs
    assert text == (
        "add table inet segd_mesh\ndelete table inet segd_mesh\n"
        "table inet segd_mesh {\n"
        "\tchain input {\n\t\ttype filter hook input priority -5; policy accept;\n"
        '\t\tip saddr 10.213.1.0/24 iifname != { "br-0123456789ab", "lo" } drop\n'
        '\t\tip saddr 10.213.0.0/16 ip saddr != 10.213.1.0/24 iifname != "segd-wg" drop\n'
        "\t}\n"
        "\tchain forward {\n\t\ttype filter hook forward priority -5; policy accept;\n"
        '\t\tip saddr 10.213.1.0/24 iifname != { "br-0123456789ab", "lo" } drop\n'
        '\t\tip saddr 10.213.0.0/16 ip saddr != 10.213.1.0/24 iifname != "segd-wg" drop\n'
        '\t\tip daddr 10.213.0.0/16 ip daddr != 10.213.1.0/24 oifname != "segd-wg" drop\n'
        "\t}\n"
        "\tchain output {\n\t\ttype filter hook output priority -5; policy accept;\n"
        '\t\tip daddr 10.213.0.0/16 ip daddr != 10.213.1.0/24 oifname != "segd-wg" drop\n'
        "\t}\n"
        "\tchain nat {\n\t\ttype nat hook postrouting priority 100; policy accept;\n"
        "\t\tip saddr 10.213.1.0/24 ip daddr != 10.213.0.0/16"
        ' oifname != "br-0123456789ab" masquerade\n'
        "\t}\n}\n"
    )


def test_docker_user_rule_and_the_stale_ones() -> None:
    d = plan.desired(mesh(), LOCAL)
    (rule,) = plan.docker_user_rules(d)
    assert rule == [
        "-i", "segd-wg", "-o", "br-0123456789ab", "-d", "10.213.1.0/24",
        "-m", "comment", "--comment", "segd-mesh", "-j", "ACCEPT",
    ]  # fmt: skip
    listing = (
        "-N DOCKER-USER\n"
        '-A DOCKER-USER -d 10.213.1.0/24 -i segd-wg -o br-0123456789ab -m comment --comment "x"'
        " -j ACCEPT\n"
        "-A DOCKER-USER -d 10.213.9.0/24 -i segd-wg -o br-old -m comment --comment segd-mesh"
        " -j ACCEPT\n"
        "-A DOCKER-USER -j RETURN\n"
    )
    old = "-d 10.213.9.0/24 -i segd-wg -o br-old -m comment --comment segd-mesh -j ACCEPT"
    assert plan.stale_docker_user_rules(listing, [rule]) == [old.split()]
    assert plan.stale_docker_user_rules(listing, []) == [old.split()]


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("10.250.0.11:51820", True),
        ("[fd00::1]:51820", True),
        ("10.250.0.11:0", False),
        ("10.250.0.11:65536", False),
        ("10.250.0.11", False),
        ("[10.0.0.1]:1", False),
        ("host:1", False),
        (":1", False),
    ],
)
def test_endpoints(text: str, ok: bool) -> None:
    if ok:
        plan.parse_endpoint(text)
    else:
        with pytest.raises(InvalidInput):
            plan.parse_endpoint(text)


# ---- the Docker network -----------------------------------------------------------------


def inspected(**over: object) -> dict[str, object]:
    net: dict[str, object] = {
        "Name": "segd",
        "Id": "0123456789abcdef",
        "Driver": "bridge",
        "Options": {network.MASQUERADE: "false"},
        "IPAM": {"Config": [{"Subnet": "10.213.1.0/24", "Gateway": "10.213.1.1"}]},
    }
    net.update(over)
    return net


def test_the_network_segd_creates_has_no_docker_masquerade() -> None:
    body = network.create_body("segd", "10.213.1.0/24")
    assert body["Options"] == {"com.docker.network.bridge.enable_ip_masquerade": "false"}
    assert body["IPAM"]["Config"] == [{"Subnet": "10.213.1.0/24", "Gateway": "10.213.1.1"}]
    assert network.adopt(inspected(), "10.213.1.0/24") == ("br-0123456789ab", "10.213.1.1")


def test_a_named_bridge_is_adopted_by_its_name() -> None:
    opts = {network.MASQUERADE: "false", network.BRIDGE_NAME: "segd0"}
    assert network.adopt(inspected(Options=opts), "10.213.1.0/24") == ("segd0", "10.213.1.1")


@pytest.mark.parametrize(
    ("over", "why"),
    [
        ({"Options": {}}, "masquerade"),
        ({"Options": {network.MASQUERADE: "true"}}, "masquerade"),
        ({"Driver": "overlay"}, "not a bridge"),
        ({"IPAM": {"Config": [{"Subnet": "10.213.2.0/24", "Gateway": "10.213.2.1"}]}}, "subnet"),
        ({"IPAM": {"Config": []}}, "subnet"),
        ({"IPAM": {"Config": [{"Subnet": "10.213.1.0/24"}]}}, "gateway"),
    ],
)
def test_a_network_that_does_not_fit_is_not_adopted(over: dict[str, object], why: str) -> None:
    with pytest.raises(InvalidInput, match=why):
        network.adopt(inspected(**over), "10.213.1.0/24")


def test_update_touches_only_what_differs() -> None:
    stays = Peer(K2.public, "10.250.0.12:51820", ("10.213.2.0/24",))
    moved = Peer(K3.public, "10.250.0.13:51820", ("10.213.3.0/24",))
    gone = Peer(K1.public, "10.250.0.11:51820", ("10.213.1.0/24",))
    old = Peer(K3.public, "10.250.0.99:51820", ("10.213.3.0/24",))
    have = uapi.Device(K1.private, 51820, (stays, old, gone))
    got = uapi.update_request(have, K1.private, 51820, [stays, moved])
    assert (
        got
        == (
            f"set=1\npublic_key={K1.public.hex()}\nremove=true\n"
            f"public_key={K3.public.hex()}\nendpoint=10.250.0.13:51820\n"
            "persistent_keepalive_interval=25\nreplace_allowed_ips=true\n"
            "allowed_ip=10.213.3.0/24\n\n"
        ).encode()
    )
    same = uapi.Device(K1.private, 51820, (stays,))
    assert uapi.update_request(same, K1.private, 51820, [stays]) is None
    assert uapi.update_request(uapi.Device(K2.private, 1, ()), K1.private, 51820, []) == (
        f"set=1\nprivate_key={K1.private.hex()}\nlisten_port=51820\n\n".encode()
    )
