"""What happens to the agent, as typed values.

Docker's event stream delivers loosely shaped JSON; `from_docker` turns each
event the agent cares about into one tagged Struct of the `DockerEvent` union
and drops the rest, so nothing past the watcher handles raw dicts. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec


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
