"""The mesh interface on real namespaces: wireguard-go driven over its UAPI socket,
the routes to peer subnets, and the pool's `unreachable` route (real packets)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from segd.mesh import keys
from tests.hostreq import mesh_missing, require
from tests.kernel.conftest import MakeNetns, Netns, Pair
from tests.meshproc import kill_wireguard_go

pytestmark = pytest.mark.kernel

POOL = "10.213.64.0/18"
SUBNETS = {"a": "10.213.65.0/24", "b": "10.213.66.0/24"}
GATEWAYS = {"a": "10.213.65.1", "b": "10.213.66.1"}

_APPLY = r"""
import json, sys
from segd import wire
from segd.firewall.kernel import WireGuardLink, apply_routes
from segd.mesh import plan
args = json.loads(sys.argv[1])
link = WireGuardLink(args["ifname"], "userspace")
mesh = wire.Mesh(pool=args["pool"], subnet=args["subnet"],
                 peers=[wire.MeshPeer(**p) for p in args["peers"]])
d = plan.desired(mesh, plan.Local(args["ifname"], "br0", args["gateway"]))
made = link.ensure()
link.configure(bytes.fromhex(args["private"]), 51820, list(d.peers))
apply_routes(d)
dev = link.device()
print(json.dumps({"made": made, "peers": [p.public_key.hex() for p in dev.peers],
                  "allowed": [list(p.allowed_ips) for p in dev.peers]}))
"""

_BAD_SET = r"""
import sys
from segd.firewall.kernel import WireGuardLink
from segd.mesh import uapi
link = WireGuardLink(sys.argv[1], "userspace")
try:
    uapi.check_errno(link._uapi(b"set=1\nlisten_port=99999999\n\n"))
except uapi.UapiError as e:
    print("errno", e.errno)
"""


def _apply(ns: Netns, me: str, other: str, pair_: Pair, pub: dict[str, str], priv: str) -> Any:
    args = {
        "ifname": f"segdt-wg{me}",
        "pool": POOL,
        "subnet": SUBNETS[me],
        "gateway": GATEWAYS[me],
        "private": priv,
        "peers": [
            {
                "host_id": other,
                "public_key": pub[other],
                "endpoint": f"{pair_.b4 if other == 'b' else pair_.a4}:51820",
                "subnet": SUBNETS[other],
            }
        ],
    }
    return json.loads(ns.run(sys.executable, "-c", _APPLY, json.dumps(args)))


@pytest.fixture
def mesh_pair(pair: Pair) -> Pair:
    require(mesh_missing())
    for me, ns in (("a", pair.a), ("b", pair.b)):
        ns.ip("link", "add", "br0", "type", "bridge")
        ns.ip("addr", "add", f"{GATEWAYS[me]}/24", "dev", "br0")
        ns.ip("link", "set", "br0", "up")
    return pair


def _kill_wireguard_go(ns: Netns) -> None:
    """SIGKILL the wireguard-go running in `ns` and wait until its TUN is gone."""
    kill_wireguard_go(ns.path)
    deadline = time.monotonic() + 10
    while "segdt-wg" in ns.ip("link", "show"):
        assert time.monotonic() < deadline, "the TUN outlived wireguard-go"
        time.sleep(0.02)


def _remove(*targets: tuple[Netns, str]) -> None:
    for ns, ifname in targets:
        subprocess.run(["ip", "-n", ns.name, "link", "del", ifname], capture_output=True)


def test_wireguard_go_peers_route_and_fail_closed(mesh_pair: Pair) -> None:
    p = mesh_pair
    pairs = {
        me: keys.from_private(bytes.fromhex(f"{i:02x}" * 32)) for i, me in ((1, "a"), (2, "b"))
    }
    pub = {me: k.public_b64 for me, k in pairs.items()}
    try:
        got_a = _apply(p.a, "a", "b", p, pub, pairs["a"].private.hex())
        got_b = _apply(p.b, "b", "a", p, pub, pairs["b"].private.hex())
        assert got_a == {
            "made": True,
            "peers": [pairs["b"].public.hex()],
            "allowed": [[SUBNETS["b"]]],
        }
        assert got_b["peers"] == [pairs["a"].public.hex()]

        # The other host's subnet is reached through the interface, from the bridge address.
        assert "dev segdt-wga" in p.a.ip("route", "get", "10.213.66.1")
        assert p.a.ping(GATEWAYS["b"], timeout=3)
        # Applying again adopts the running interface and changes nothing.
        assert _apply(p.a, "a", "b", p, pub, pairs["a"].private.hex()) == {**got_a, "made": False}

        # The device refuses a bad request with an errno, which the client surfaces.
        assert p.a.run(sys.executable, "-c", _BAD_SET, "segdt-wga").split()[0] == "errno"

        # wireguard-go killed on b: its routes went with its TUN; the pool is unreachable
        # there (not the default route, which b has) and a's probes time out.
        p.b.ip("route", "add", "default", "via", p.a4)
        assert "unreachable 10.213.64.0/18" in p.b.ip("route", "show")
        _kill_wireguard_go(p.b)
        gone = subprocess.run(
            ["ip", "-n", p.b.name, "route", "get", "10.213.65.1"], capture_output=True, text=True
        )
        assert gone.returncode != 0 and "no route to host" in gone.stderr.lower(), gone
        assert not p.a.ping(GATEWAYS["b"], timeout=1)
    finally:
        _remove((p.a, "segdt-wga"), (p.b, "segdt-wgb"))


_ROUTES = r"""
import sys
from segd import wire
from segd.firewall.kernel import apply_routes
from segd.mesh import plan
for pool, subnet in (("10.213.64.0/18", "10.213.65.0/24"), ("10.77.0.0/16", "10.77.1.0/24")):
    mesh = wire.Mesh(pool=pool, subnet=subnet, peers=[])
    apply_routes(plan.desired(mesh, plan.Local("segdt-wgr", "br0", subnet[:-4] + "1")))
"""


def test_a_new_pool_replaces_the_old_pools_unreachable_route_and_no_other(
    make_netns: MakeNetns,
) -> None:
    """The server's pool changed: the host's old pool is no longer blackholed by
    segd, the new one is, and an `unreachable` route segd did not make stays."""
    ns = make_netns("rt")
    ns.ip("route", "add", "unreachable", "192.0.2.0/24")  # somebody else's
    ns.run(sys.executable, "-c", _ROUTES)
    rows = json.loads(ns.ip("-j", "-4", "route", "show", "type", "unreachable"))
    assert sorted(r["dst"] for r in rows) == ["10.77.0.0/16", "192.0.2.0/24"]
