"""Records the orchestrator keeps: profiles (with the full key), nodes, containers.

These never cross the API as they are; `segd.orchestrator.wire` has the views.
A `ProfileRecord` hides its key from `repr`, so logging one cannot leak it.
"""

from __future__ import annotations

import msgspec

from segd.orchestrator import wire
from segd.policy import Labels


class ProfileRecord(msgspec.Struct, frozen=True):
    name: str
    image: str
    command: list[str]
    env: dict[str, str]
    networks: list[str]
    labels: Labels
    pairing_key: str  # the secret: only ever sent to Docker
    description: str
    created_at: float

    def __repr__(self) -> str:
        return f"ProfileRecord(name={self.name!r}, image={self.image!r}, pairing_key=<masked>)"

    def view(self) -> wire.Profile:
        return wire.Profile(
            name=self.name,
            image=self.image,
            command=self.command,
            env=self.env,
            networks=self.networks,
            labels=self.labels,
            pairing_key=wire.mask(self.pairing_key),
            description=self.description,
            created_at=self.created_at,
        )


class ContainerRecord(msgspec.Struct, frozen=True):
    """A container the orchestrator started and has not removed."""

    id: str
    name: str
    node: str
    profile: str
    created_at: float
