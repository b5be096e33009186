"""The Docker network containers join for the mesh (pure): what to create, and
whether an existing one can be adopted.

The network is a bridge with the host's mesh subnet and Docker's masquerade
off (`com.docker.network.bridge.enable_ip_masquerade=false`): Docker would
otherwise rewrite the source of everything leaving the bridge by another
interface, the mesh interface included, and the receiving host would see this
host's address instead of the container's. segd masquerades what leaves for
destinations outside the pool itself (`plan.render_table`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from segd.errors import InvalidInput
from segd.mesh.plan import gateway_of

MASQUERADE = "com.docker.network.bridge.enable_ip_masquerade"
BRIDGE_NAME = "com.docker.network.bridge.name"
LABEL = "segd.mesh"


def create_body(name: str, subnet: str) -> dict[str, Any]:
    """The `POST /networks/create` body for the mesh network."""
    return {
        "Name": name,
        "Driver": "bridge",
        "CheckDuplicate": True,
        "IPAM": {
            "Driver": "default",
            "Config": [{"Subnet": subnet, "Gateway": gateway_of(subnet)}],
        },
        "Options": {MASQUERADE: "false"},
        "Labels": {LABEL: "1"},
    }


def adopt(net: Mapping[str, Any], subnet: str) -> tuple[str, str]:
    """(bridge name, gateway) of an existing network usable as the mesh network;
    InvalidInput saying why not (then nothing of the mesh is applied)."""
    name = str(net.get("Name", ""))
    if net.get("Driver") != "bridge":
        raise InvalidInput(f"network {name!r} exists and is not a bridge network")
    opts = net.get("Options") or {}
    if str(opts.get(MASQUERADE, "true")).lower() != "false":
        raise InvalidInput(
            f"network {name!r} exists with Docker's masquerade on; remove it or create it with"
            f" -o {MASQUERADE}=false"
        )
    configs = [c for c in (net.get("IPAM") or {}).get("Config") or [] if c]
    v4 = [c for c in configs if ":" not in str(c.get("Subnet", ""))]
    want = ipaddress.ip_network(subnet)
    if len(v4) != 1 or _net(v4[0].get("Subnet")) != want:
        got = ", ".join(str(c.get("Subnet")) for c in v4) or "none"
        raise InvalidInput(f"network {name!r} exists with subnet {got}, not the mesh's {want}")
    gateway = str(v4[0].get("Gateway") or "")
    try:
        if ipaddress.ip_address(gateway) not in want:
            raise ValueError
    except ValueError:
        raise InvalidInput(f"network {name!r} has no gateway inside {want}") from None
    bridge = str(opts.get(BRIDGE_NAME) or "") or "br-" + str(net.get("Id", ""))[:12]
    if bridge == "br-":
        raise InvalidInput(f"network {name!r}: cannot tell its bridge")
    return bridge, gateway


def _net(text: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(str(text))
    except ValueError:
        return None
