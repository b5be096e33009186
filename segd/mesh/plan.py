"""The host's desired mesh state from the server's `wire.Mesh` (pure).

Given this host's part of the mesh (pool, own subnet, peers) and where it lives
locally (the WireGuard interface, the Docker bridge of the mesh network and its
gateway address), `desired` returns what the kernel should hold:

- the interface's peers: one per other host, allowed IPs = that host's subnet
  (WireGuard's cryptokey routing: a packet from a peer is accepted only with a
  source inside its subnet, so no host can send as another host's containers);
- a route to each peer's subnet through the interface, with the local bridge's
  address as source, and an `unreachable` route for the whole pool, so a
  missing peer or route never falls back to the default route in clear;
- `inet segd_mesh` (`render_table`): traffic with a pool source enters only
  from the interface (the local subnet only from the local bridge), traffic to
  another host's subnet leaves only through it, and the local subnet is
  masqueraded towards everything outside the pool (the Docker network is made
  with Docker's masquerade off, so addresses are preserved across the mesh);
- the accept in Docker's `DOCKER-USER` chain that lets routed mesh traffic
  into the bridge (Docker's forward filter drops it otherwise, and an accept in
  another table does not override that drop).

Peers the server sent that cannot be used (a bad key, endpoint or subnet) are
left out, with the reason: their traffic is unreachable, never in clear.
"""

from __future__ import annotations

import ipaddress
import re

import msgspec

from segd import wire
from segd.errors import InvalidInput
from segd.firewall.plan import Plan, Table
from segd.mesh import keys
from segd.mesh.uapi import Peer

TABLE = Table("inet", "segd_mesh")
IFNAME = "segd-wg"
DEFAULT_PORT = 51820
COMMENT = "segd-mesh"
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}\Z")


class Local(msgspec.Struct, frozen=True):
    """Where this host's part of the mesh lives."""

    ifname: str  # the WireGuard interface
    bridge: str  # the Docker bridge of the mesh network
    gateway: str  # the bridge's address (in the host's subnet)


class Desired(msgspec.Struct, frozen=True):
    pool: str
    subnet: str
    local: Local
    peers: tuple[Peer, ...]
    routes: tuple[str, ...]  # peer subnets, through the interface
    skipped: tuple[str, ...] = ()  # why a peer was left out, one line each


def parse_endpoint(text: str) -> tuple[str, int]:
    """`IP:PORT` or `[IPv6]:PORT`; InvalidInput otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidInput(f"invalid endpoint {text[:64]!r}: want IP:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise InvalidInput(f"invalid endpoint {text[:64]!r}")
    elif ":" in host:
        raise InvalidInput(f"invalid endpoint {text[:64]!r}: write IPv6 as [IP]:PORT")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise InvalidInput(f"invalid endpoint {text[:64]!r}: not an IP address") from None
    return host, int(port)


def check_pool(pool: str, subnet: str) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Network]:
    try:
        p, s = ipaddress.ip_network(pool), ipaddress.ip_network(subnet)
    except ValueError as e:
        raise InvalidInput(f"invalid mesh pool or subnet: {e}") from None
    if not isinstance(p, ipaddress.IPv4Network) or not isinstance(s, ipaddress.IPv4Network):
        raise InvalidInput("the mesh pool and subnets are IPv4")
    if not s.subnet_of(p) or s == p:
        raise InvalidInput(f"subnet {subnet} is not inside the pool {pool}")
    return p, s


def check_local(local: Local, subnet: ipaddress.IPv4Network) -> None:
    for name in (local.ifname, local.bridge):
        if not _IFNAME_RE.match(name):
            raise InvalidInput(f"invalid interface name {name!r}")
    try:
        gw = ipaddress.ip_address(local.gateway)
    except ValueError:
        raise InvalidInput(f"invalid gateway {local.gateway!r}") from None
    if gw not in subnet:
        raise InvalidInput(f"gateway {gw} is not in the subnet {subnet}")


def gateway_of(subnet: str) -> str:
    """The bridge address segd gives a network it creates: the subnet's first host."""
    net = ipaddress.ip_network(subnet)
    return str(next(net.hosts()))


def desired(mesh: wire.Mesh, local: Local, own_key: bytes | None = None) -> Desired:
    """What the kernel should hold for `mesh` (InvalidInput when the pool, the
    subnet or `local` is unusable: then nothing of the mesh is applied)."""
    pool, subnet = check_pool(mesh.pool, mesh.subnet)
    check_local(local, subnet)
    peers: list[Peer] = []
    routes: list[str] = []
    skipped: list[str] = []
    taken: list[ipaddress.IPv4Network] = [subnet]
    seen: set[bytes] = set()
    if own_key is not None:
        seen.add(own_key)
    for p in sorted(mesh.peers):
        try:
            peer, net = _peer(p, pool)
        except InvalidInput as e:
            skipped.append(f"host {p.host_id[:32]}: {e.message}")
            continue
        if any(net.overlaps(t) for t in taken):
            skipped.append(f"host {p.host_id[:32]}: subnet {net} overlaps another")
            continue
        if peer.public_key in seen:
            skipped.append(f"host {p.host_id[:32]}: public key used twice")
            continue
        taken.append(net)
        seen.add(peer.public_key)
        peers.append(peer)
        routes.append(str(net))
    return Desired(
        str(pool), str(subnet), local, tuple(sorted(peers)), tuple(sorted(routes)), tuple(skipped)
    )


def _peer(p: wire.MeshPeer, pool: ipaddress.IPv4Network) -> tuple[Peer, ipaddress.IPv4Network]:
    key = keys.decode_public(p.public_key)
    parse_endpoint(p.endpoint)
    try:
        net = ipaddress.ip_network(p.subnet)
    except ValueError:
        raise InvalidInput(f"invalid subnet {p.subnet[:64]!r}") from None
    if not isinstance(net, ipaddress.IPv4Network) or not net.subnet_of(pool) or net == pool:
        raise InvalidInput(f"subnet {net} is not inside the pool {pool}")
    return Peer(key, p.endpoint, (str(net),)), net


def render_table(d: Desired) -> Plan:
    """`inet segd_mesh`, replaced whole in one transaction (its rules hold no sets)."""
    wg, br, pool, own = d.local.ifname, d.local.bridge, d.pool, d.subnet
    inbound = [
        f'ip saddr {own} iifname != {{ "{br}", "lo" }} drop',
        f'ip saddr {pool} ip saddr != {own} iifname != "{wg}" drop',
    ]
    outbound = [f'ip daddr {pool} ip daddr != {own} oifname != "{wg}" drop']
    body = [
        *_chain("input", "filter", "input", -5, inbound),
        *_chain("forward", "filter", "forward", -5, [*inbound, *outbound]),
        *_chain("output", "filter", "output", -5, outbound),
        *_chain(
            "nat",
            "nat",
            "postrouting",
            100,
            [f'ip saddr {own} ip daddr != {pool} oifname != "{br}" masquerade'],
        ),
    ]
    text = f"add table {TABLE}\ndelete table {TABLE}\n" + "\n".join(
        [f"table {TABLE} {{", *body, "}"]
    )
    return Plan("mesh", (text + "\n",))


def _chain(name: str, typ: str, hook: str, prio: int, rules: list[str]) -> list[str]:
    head = f"type {typ} hook {hook} priority {prio}; policy accept;"
    return [f"\tchain {name} {{", f"\t\t{head}", *(f"\t\t{r}" for r in rules), "\t}"]


def render_table_removal() -> Plan:
    return Plan("mesh_removal", (f"add table {TABLE}\ndelete table {TABLE}\n",))


def docker_user_rules(d: Desired) -> list[list[str]]:
    """iptables rule specs (for `-A`/`-C`/`-D DOCKER-USER`) admitting mesh traffic
    routed in from the interface to the local bridge."""
    return [
        [
            "-i",
            d.local.ifname,
            "-o",
            d.local.bridge,
            "-d",
            d.subnet,
            "-m",
            "comment",
            "--comment",
            COMMENT,
            "-j",
            "ACCEPT",
        ]
    ]


def stale_docker_user_rules(listing: str, keep: list[list[str]]) -> list[list[str]]:
    """From `iptables -S DOCKER-USER`, segd's rules that are not in `keep` (as specs)."""
    out: list[list[str]] = []
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[0] != "-A" or parts[1] != "DOCKER-USER":
            continue
        if f'"{COMMENT}"' not in line and f" {COMMENT} " not in f"{line} ":
            continue
        spec = [p.strip('"') for p in parts[2:]]
        if _normal(spec) not in [_normal(k) for k in keep]:
            out.append(spec)
    return out


def _normal(spec: list[str]) -> list[str]:
    """iptables -S writes `-d 10.0.0.0/24` as given and comments quoted or not."""
    return [s.strip('"') for s in spec]
