"""Docker's event JSON -> the agent's typed events (table)."""

from __future__ import annotations

from typing import Any

import pytest

from segd.agent.events import (
    BridgesChanged,
    ContainerGone,
    ContainerNetworksChanged,
    ContainerStarted,
    DockerEvent,
    from_docker,
)

CID = "c0ffee" * 10


def _container(action: str, **extra: Any) -> dict[str, Any]:
    return {"Type": "container", "Action": action, "Actor": {"ID": CID, "Attributes": {}}, **extra}


CASES: list[tuple[str, dict[str, Any], DockerEvent | None]] = [
    ("start", _container("start"), ContainerStarted(CID)),
    ("die", _container("die"), ContainerGone(CID)),
    ("destroy", _container("destroy"), ContainerGone(CID)),
    ("create is ignored", _container("create"), None),
    ("kill is ignored", _container("kill"), None),
    ("stop is ignored", _container("stop"), None),
    ("old status field", {"status": "start", "id": CID}, ContainerStarted(CID)),
    ("no id", {"Type": "container", "Action": "start", "Actor": {}}, None),
    ("actor not an object", {"Type": "container", "Action": "start", "Actor": "x"}, None),
    (
        "network create",
        {"Type": "network", "Action": "create", "Actor": {"ID": "n1"}},
        BridgesChanged(),
    ),
    (
        "network destroy",
        {"Type": "network", "Action": "destroy", "Actor": {"ID": "n1"}},
        BridgesChanged(),
    ),
    (
        "network connect",
        {"Type": "network", "Action": "connect", "Actor": {"Attributes": {"container": CID}}},
        ContainerNetworksChanged(CID),
    ),
    (
        "network disconnect",
        {"Type": "network", "Action": "disconnect", "Actor": {"Attributes": {"container": CID}}},
        ContainerNetworksChanged(CID),
    ),
    (
        "network connect without a container",
        {"Type": "network", "Action": "connect", "Actor": {"Attributes": {}}},
        None,
    ),
    ("network prune", {"Type": "network", "Action": "prune", "Actor": {}}, None),
    ("empty", {}, None),
]


@pytest.mark.parametrize(("ev", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_from_docker(ev: dict[str, Any], want: DockerEvent | None) -> None:
    assert from_docker(ev) == want
