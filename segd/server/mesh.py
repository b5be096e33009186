"""The segd mesh on the server side: the pool, address scopes, subnets, join input.

A workload address is *mesh* when it lies inside the pool (`[server.mesh]
pool`): such an address is unique in the fleet and reaches other hosts through
the mesh. Every other address is *host-local* (a default Docker bridge's, say):
it is unique on its host only, and only that host's instructions carry it.

Each mesh host gets its own subnet of the pool (`host_prefix` long) when it
first joins, and keeps it: joining again changes its WireGuard key and endpoint
only. A revoked host keeps its subnet (hosts are never deleted), so a subnet is
never given to a second host.

Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import socket
from collections.abc import Callable, Collection

from segd.config import MeshConfig
from segd.errors import InvalidInput

MESH_SCOPE = ""  # the scope of mesh addresses; a host-local address's scope is its host id
WG_KEY_BYTES = 32

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def matcher(pool: str) -> Callable[[str], bool]:
    """A fast test of whether an address text is inside `pool` (an IPv4 CIDR, or
    "" for none): one C call and a mask, not an `ipaddress` object per address.
    Anything but a plain dotted-quad IPv4 address is outside."""
    if not pool:
        return lambda ip: False
    net = ipaddress.IPv4Network(pool)
    mask, base = int(net.netmask), int(net.network_address)
    pton, af = socket.inet_pton, socket.AF_INET

    def inside(ip: str) -> bool:
        try:
            return int.from_bytes(pton(af, ip), "big") & mask == base
        except (OSError, ValueError, TypeError):
            return False

    return inside


class Pool:
    """The mesh pool, or none (`enabled` False: every address is host-local)."""

    def __init__(self, cfg: MeshConfig) -> None:
        self.text = cfg.pool
        self.host_prefix = cfg.host_prefix
        self.net: Network | None = ipaddress.ip_network(cfg.pool) if cfg.pool else None
        self._inside = matcher(cfg.pool)

    @property
    def enabled(self) -> bool:
        return self.net is not None

    def is_mesh(self, ip: str) -> bool:
        """Whether the address is inside the pool (an unparsable one is not)."""
        return self._inside(ip)

    def scope_of(self, host_id: str, ip: str) -> str:
        """The scope an address is unique in: the fleet for mesh, else its host."""
        return MESH_SCOPE if self.is_mesh(ip) else host_id

    def allocate(self, held: Collection[str]) -> str | None:
        """The first subnet of the pool no host holds; None when the pool is exhausted."""
        if self.net is None:
            return None
        for i, sub in enumerate(self.net.subnets(new_prefix=self.host_prefix)):
            if str(sub) not in held:
                return str(sub)
            if i > len(held):  # more subnets tried than are held: cannot happen
                break
        return None

    def holds(self, subnet: str) -> bool:
        """Whether `subnet` is one of this pool's host subnets (as configured now)."""
        if self.net is None or not subnet:
            return False
        try:
            sub = ipaddress.ip_network(subnet)
        except ValueError:
            return False
        return sub.prefixlen == self.host_prefix and sub.subnet_of(self.net)  # type: ignore[arg-type]


def in_subnet(ip: str, subnet: str) -> bool:
    """Whether the mesh address `ip` is inside the host subnet `subnet`."""
    try:
        inside = _subnet_matcher(subnet)
    except ValueError:
        return False
    return inside(ip)


@functools.lru_cache(maxsize=4096)
def _subnet_matcher(subnet: str) -> Callable[[str], bool]:
    return matcher(subnet)


def public_key(text: str) -> str:
    """A WireGuard public key: standard base64 of 32 bytes, in canonical form."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidInput("public_key: not base64") from None
    if len(raw) != WG_KEY_BYTES or base64.b64encode(raw).decode() != text:
        raise InvalidInput(f"public_key: expected the base64 of {WG_KEY_BYTES} bytes")
    if raw == bytes(WG_KEY_BYTES):
        raise InvalidInput("public_key: the all-zero key is not a key")
    return text


def endpoint(text: str) -> str:
    """`IP:PORT` (IPv6 as `[IP]:PORT`), a unicast address and a port 1-65535;
    returned with the address in its canonical form."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidInput(f"endpoint {text[:64]!r}: expected IP:PORT ([IP]:PORT for IPv6)")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        addr = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise InvalidInput(f"endpoint {text[:64]!r}: {host[:64]!r} is not an IP address") from None
    if bracketed != (addr.version == 6):
        raise InvalidInput(f"endpoint {text[:64]!r}: write an IPv6 address as [IP]:PORT")
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        raise InvalidInput(f"endpoint {text[:64]!r}: scoped addresses are not allowed")
    if addr.is_unspecified or addr.is_multicast or (addr.version == 4 and addr.is_reserved):
        raise InvalidInput(f"endpoint {text[:64]!r}: not a unicast address")
    return f"[{addr}]:{int(port)}" if addr.version == 6 else f"{addr}:{int(port)}"
