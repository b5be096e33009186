"""One agent per host, where a host is the network namespace the agent enforces in.

The host gate is one table in the agent's own network namespace: two agents in
the same namespace would keep undoing each other's entries, while agents in
different namespaces (simulated hosts, each with its own Docker engine) never
meet. So the lock is keyed on the namespace: the initial namespace keeps the
historical `/run/segd/agent.lock`; any other namespace locks
`/run/segd/agent.<inode>.lock`, its nsfs inode being the namespace's identity
while it lives (what `ip netns identify` and `lsns` compare).

The initial namespace has the fixed inode 0xEFFFFFF9 since Linux 6.18; on older
kernels the agent compares with PID 1's namespace. When its own namespace, or
(on an older kernel) PID 1's, cannot be read, the agent takes the default lock,
as it always did.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

HOST_LOCK = "/run/segd/agent.lock"
OWN_NETNS = "/proc/self/ns/net"
PID1_NETNS = "/proc/1/ns/net"
NET_NS_INIT_INO = 0xEFFFFFF9  # the initial namespace, fixed since Linux 6.18


def lock_path_for(own_netns: int | None, init_netns: int | None) -> str:
    """The lock for an agent in namespace `own_netns` (nsfs inodes; None = unreadable)."""
    if own_netns is None or init_netns is None or own_netns == init_netns:
        return HOST_LOCK
    return str(Path(HOST_LOCK).with_name(f"agent.{own_netns}.lock"))


def kernel_fixes_init_netns(release: str) -> bool:
    """Whether a kernel (`uname -r`) gives the initial namespace NET_NS_INIT_INO."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return m is not None and (int(m[1]), int(m[2])) >= (6, 18)


def netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def initial_netns_inode() -> int | None:
    if kernel_fixes_init_netns(os.uname().release):
        return NET_NS_INIT_INO
    return netns_inode(PID1_NETNS)


def host_lock_path() -> str:
    """The lock of the network namespace this process runs in."""
    return lock_path_for(netns_inode(OWN_NETNS), initial_netns_inode())
