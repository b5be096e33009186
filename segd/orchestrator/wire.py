"""Wire types of the orchestrator API (msgspec Structs), and key masking.

`*In` types are request bodies, decoded strictly (unknown fields and wrong types
are refused). A pairing key leaves the orchestrator in full only as a Docker
label; everywhere else it is `mask`ed.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from segd.policy import Labels

MASK_PREFIX = 10

# Bounds of API input that the types state (`msgspec.Meta`): decoding refuses a
# value outside them (400 `invalid_input`) and the OpenAPI document shows them.
MAX_ARGS = 256
MAX_ENV = 128
MAX_NETWORKS = 8
MAX_RUN = 50


def mask(key: str) -> str:
    """`segd1.eyJ2…(masked)`: a short prefix that identifies, never reveals."""
    if not key:
        return ""
    shown = min(MASK_PREFIX, len(key) // 4)
    return key[:shown] + "…(masked)"


class ProfileIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    image: str
    pairing_key: str
    command: Annotated[list[str], msgspec.Meta(max_length=MAX_ARGS)] = []
    env: Annotated[dict[str, str], msgspec.Meta(max_length=MAX_ENV)] = {}
    networks: Annotated[list[str], msgspec.Meta(max_length=MAX_NETWORKS)] = []
    labels: Labels = {}
    description: str = ""


class Profile(msgspec.Struct, frozen=True):
    """A container profile as listed: the pairing key is masked."""

    name: str
    image: str
    command: list[str]
    env: dict[str, str]
    networks: list[str]
    labels: Labels
    pairing_key: str
    description: str
    created_at: float


class KeyIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new pairing key for a container profile (for the containers started next)."""

    pairing_key: str


class NodeIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    endpoint: str
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""


class Node(msgspec.Struct, frozen=True):
    name: str
    endpoint: str
    tls_cert: str
    tls_key: str
    tls_ca: str
    created_at: float


class RunIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    profile: str
    node: str | None = None
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_RUN)] = 1


class ChangeIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    profile: str


State = Literal[
    "created", "running", "paused", "restarting", "removing", "exited", "dead", "missing", "unknown"
]


class Container(msgspec.Struct, frozen=True):
    """A container the orchestrator started, with its live state on the node.

    `state` is Docker's, or `missing` (gone from the node) or `unknown` (node
    unreachable). `labels` and `pairing_key` (masked) are what the container
    carries.
    """

    id: str
    name: str
    node: str
    profile: str
    created_at: float
    state: State
    status: str
    labels: Labels
    pairing_key: str


class Removed(msgspec.Struct, frozen=True):
    id: str
    name: str
    node: str
    was_gone: bool  # already removed from the node by someone else


class Changed(msgspec.Struct, frozen=True):
    old: str  # the removed container's id
    new: Container
