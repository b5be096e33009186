"""One network namespace, one owner: which container decides each namespace's table.

Docker lets a container join another's namespace (`--network container:X`,
compose `network_mode: service:x`): a sidecar. Two containers in one namespace
must not both be enforced, or their tables replace each other on every
reconcile; and a container in the host's namespace (`--network host`, or
joined to a host-networked container, or whose pid now belongs to a host
process) must never get a container table at all.

`assign` decides from namespace identities (device and inode of the nsfs
file), not from Docker's `NetworkMode` alone. Pure: the caller reads the
identities.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Set
from typing import Literal

import msgspec

NsId = tuple[int, int]
"""A namespace's identity: (st_dev, st_ino) of its nsfs file."""

RoleKind = Literal["owner", "shares", "host", "unknown"]


class Seen(msgspec.Struct, frozen=True):
    """A running container, as far as namespace ownership goes."""

    id: str
    joins: str  # X of `NetworkMode: container:X`; "" when it made its own namespace
    host_mode: bool  # `NetworkMode: host`
    ns: NsId | None  # identity of /proc/PID/ns/net; None when it could not be read


class Role(msgspec.Struct, frozen=True):
    """What the agent does with one container's namespace.

    * `owner`   — the container decides its namespace's table: enforced.
    * `shares`  — it is in a namespace another container made (`owner`, or
      the container it joined when that one is not running here or is no
      longer in it): never enforced on its own, never paired.
    * `host`    — it is in the host's namespace: never enforced, never paired.
    * `unknown` — its namespace could not be read, or two containers that each
      made their own namespace are seen in one (a stale pid): not enforced
      until that clears (the gate keeps its addresses out meanwhile).
    """

    kind: RoleKind
    owner: str = ""


OWNER = Role("owner")
HOST = Role("host")
UNKNOWN = Role("unknown")


def joined(network_mode: str) -> str:
    """The container a `container:X` network mode joins; "" for any other mode."""
    prefix, sep, target = network_mode.partition(":")
    return target if sep and prefix == "container" else ""


def assign(seen: Iterable[Seen], host: Set[NsId]) -> dict[str, Role]:
    """Each container's role. `host` holds the host's namespace identities (the
    agent's own, init's): no container in one of those is ever an owner, and
    neither is one in the namespace of a host-networked container."""
    seen = list(seen)
    host_ns = set(host) | {s.ns for s in seen if s.host_mode and s.ns is not None}
    roles: dict[str, Role] = {}
    groups: dict[NsId, list[Seen]] = defaultdict(list)
    for s in seen:
        if s.host_mode or (s.ns is not None and s.ns in host_ns):
            roles[s.id] = HOST
        elif s.ns is None:
            roles[s.id] = UNKNOWN
        else:
            groups[s.ns].append(s)
    for members in groups.values():
        # A joiner never made a namespace: only a container that did can own one.
        makers = [s for s in members if not s.joins]
        owner = makers[0].id if len(makers) == 1 else ""
        for s in members:
            if s.joins:
                roles[s.id] = Role("shares", owner or s.joins)
            elif owner:
                roles[s.id] = OWNER
            else:  # two "own" namespaces that are one: a stale pid; wait for Docker
                roles[s.id] = UNKNOWN
    return roles
