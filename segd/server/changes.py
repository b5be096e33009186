"""What a durable transaction changed that the compiled instructions depend on.

The store records one of these for each write that can alter a host's
instructions, in statement order, and hands them over with the transaction's
generation once it is durable (`Commit`). The core applies them to the
compiler and the publisher in commit order; nothing in memory is edited
before the store has committed, so nothing is ever undone.
"""

from __future__ import annotations

import msgspec

from segd import wire


class WorkloadAdded(msgspec.Struct, frozen=True, tag=True):
    workload: wire.Workload


class WorkloadReaddressed(msgspec.Struct, frozen=True, tag=True):
    """The same workload with new addresses."""

    workload: wire.Workload


class WorkloadRemoved(msgspec.Struct, frozen=True, tag=True):
    workload_id: str


class RulesSet(msgspec.Struct, frozen=True, tag=True):
    """Every rule, as the transaction left them."""

    rules: list[wire.Rule]


class HostAdded(msgspec.Struct, frozen=True, tag=True):
    host_id: str
    public_key: str


class HostMeshJoined(msgspec.Struct, frozen=True, tag=True):
    """A host joined the mesh, or joined again with a new key or endpoint."""

    peer: wire.MeshPeer


class HostRevoked(msgspec.Struct, frozen=True, tag=True):
    host_id: str


class HostsRecompiled(msgspec.Struct, frozen=True, tag=True):
    """Hosts to publish at this generation whatever their content: it no longer
    matches the digest persisted for it (a compiler that compiles differently, a
    store restored from elsewhere), or versions may have been lost in a crash."""

    host_ids: list[str]


Change = (
    WorkloadAdded
    | WorkloadReaddressed
    | WorkloadRemoved
    | RulesSet
    | HostAdded
    | HostMeshJoined
    | HostRevoked
    | HostsRecompiled
)


class Commit(msgspec.Struct, frozen=True):
    """One durable transaction's changes, in order, and its generation: one more
    than the last commit that had changes (persisted with them, so generations
    never go back across restarts)."""

    generation: int
    changes: list[Change]
