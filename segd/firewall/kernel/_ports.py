"""Which bridge port each of a namespace's addresses lives behind (on the worker).

See `Firewall.ports` for what is kept and what is skipped.
"""

from __future__ import annotations

import os
import socket

from segd.firewall.gate import PORT_RE
from segd.firewall.kernel import _rtnl
from segd.firewall.kernel._worker import Worker, open_ns


def read_ports(w: Worker, path: str, home_fd: int, gate_path: str | None) -> dict[str, str]:
    """Address -> gate-side veth name, for the namespace at `path`.

    `home_fd` is the worker's home namespace: the gate's when `gate_path` is None.
    """
    fd, _ = open_ns(path)
    try:
        sock = w.made_in(fd, _rtnl.Rtnl)
    finally:
        os.close(fd)
    gate_fd: int | None = None
    try:
        with sock:
            if gate_path is not None:
                gate_fd, _ = open_ns(gate_path)
            links = sock.links()
            addresses = sock.addresses()
            # Asked after the link dump, which assigns ids to the peers' namespaces.
            gate_id = sock.nsid(home_fd if gate_fd is None else gate_fd)
        peers = {
            link.index: link.peer
            for link in links
            if link.kind == "veth" and link.peer is not None and link.peer_netnsid == gate_id
        }
        names = _if_names(w, gate_fd, set(peers.values()))
    finally:
        if gate_fd is not None:
            os.close(gate_fd)
    found: dict[str, str] = {}
    for a in sorted(addresses, key=lambda a: a.index):
        peer = peers.get(a.index)
        name = None if peer is None else names.get(peer)
        if name is None or not PORT_RE.match(name):
            continue
        if a.scope >= _rtnl.RT_SCOPE_LINK or a.ip.is_loopback or a.ip.is_link_local:
            continue
        found.setdefault(str(a.ip), name)
    return found


def _if_names(w: Worker, fd: int | None, indexes: set[int]) -> dict[int, str]:
    """Interface names by index in the namespace `fd` (None: home); gone ones left out."""

    def lookup() -> dict[int, str]:
        names: dict[int, str] = {}
        for index in indexes:
            try:
                names[index] = socket.if_indextoname(index)
            except OSError:
                continue
        return names

    if not indexes:
        return {}
    if fd is None:
        return lookup()  # the worker is at home between jobs
    with w.entered(fd):
        return lookup()
