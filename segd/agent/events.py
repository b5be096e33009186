"""What happens to the agent, as typed values.

Docker's event stream delivers loosely shaped JSON; `from_docker` turns each
event the agent cares about into one tagged Struct of the `DockerEvent` union
and drops the rest, so nothing past the watcher handles raw dicts.

`HostEvent` is what the agent's knowledge of its host (`segd.agent.host`) is
fed: what Docker says about a container, instructions accepted from the
server, a pairing answered or refused, the bridges' subnets. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from segd.agent.sharing import NsId, joined
from segd.wire import Instructions


class ContainerInfo(msgspec.Struct, frozen=True):
    """A running container as the agent needs it."""

    id: str
    name: str
    pid: int
    ips: list[str]  # every address on every network, v4 and v6, sorted
    networks: dict[str, str]  # network name -> IPv4 address ("" when none)
    pairing_key: str  # "" when the container carries none
    requested_labels: dict[str, str]
    host_network: bool  # shares the host namespace: cannot be enforced per container
    network_mode: str = ""  # HostConfig.NetworkMode: "bridge", "host", "container:ID", ...

    @property
    def netns_path(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    @property
    def joins(self) -> str:
        """The container whose namespace it joined (`container:ID`); "" if none."""
        return joined(self.network_mode)


class ContainerStarted(msgspec.Struct, frozen=True, tag="started"):
    """A container started (or was restarted): inspect it and bring it to its state."""

    container_id: str


class ContainerGone(msgspec.Struct, frozen=True, tag="gone"):
    """A container died or was removed: withdraw it from the gate and unpair it."""

    container_id: str


class ContainerNetworksChanged(msgspec.Struct, frozen=True, tag="attached"):
    """A running container was connected to or disconnected from a network."""

    container_id: str


class BridgesChanged(msgspec.Struct, frozen=True, tag="bridges"):
    """A Docker network was created or removed: the gate's subnets may change."""


DockerEvent = ContainerStarted | ContainerGone | ContainerNetworksChanged | BridgesChanged


class ContainerSeen(msgspec.Struct, frozen=True, tag="seen"):
    """Docker's view of a running container, and the identity of its namespace
    (None: unreadable). `started`: seen because of an event about it after the
    agent's first sync (every start is seen then): if it is new to the agent,
    its namespace was just made and holds no segd table."""

    info: ContainerInfo
    ns: NsId | None
    started: bool = False


class Listed(msgspec.Struct, frozen=True, tag="listed"):
    """Every running container has been seen (a full reconcile against Docker)."""


class SubnetsSeen(msgspec.Struct, frozen=True, tag="subnets"):
    """The subnets of Docker's bridge networks, which the host gate guards."""

    subnets: tuple[str, ...]


class MeshState(msgspec.Struct, frozen=True, tag="mesh"):
    """Whether the kernel routes the mesh pool (through the WireGuard interface,
    or nowhere): only then may another host's mesh address be a peer, for its
    traffic can then not leave the host in clear."""

    up: bool


class InstructionsAccepted(msgspec.Struct, frozen=True, tag="instructions"):
    """Verified instructions, newer than any the agent had."""

    instructions: Instructions


class Paired(msgspec.Struct, frozen=True, tag="paired"):
    """The server paired a container; its workload is in instructions of `version`
    on (0: the answer carried them)."""

    container_id: str
    version: int
    ips: list[str]


class PairingRefused(msgspec.Struct, frozen=True, tag="refused"):
    """The server refused to pair a container, for a reason that will not change."""

    container_id: str
    reason: str


HostEvent = (
    ContainerSeen
    | ContainerGone
    | Listed
    | SubnetsSeen
    | MeshState
    | InstructionsAccepted
    | Paired
    | PairingRefused
)

_GONE = frozenset({"die", "destroy"})


def from_docker(ev: Mapping[str, Any]) -> DockerEvent | None:
    """The typed event for one Docker event, or None when the agent ignores it."""
    action = str(ev.get("Action") or ev.get("status") or "")
    actor = ev.get("Actor") or {}
    if not isinstance(actor, Mapping):
        return None
    if ev.get("Type") == "network":
        if action in ("create", "destroy"):
            return BridgesChanged()
        if action in ("connect", "disconnect"):
            attrs = actor.get("Attributes") or {}
            cid = str(attrs.get("container") or "") if isinstance(attrs, Mapping) else ""
            return ContainerNetworksChanged(cid) if cid else None
        return None
    cid = str(actor.get("ID") or ev.get("id") or "")
    if not cid:
        return None
    if action == "start":
        return ContainerStarted(cid)
    if action in _GONE:
        return ContainerGone(cid)
    return None
