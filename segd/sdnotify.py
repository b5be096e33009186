"""systemd readiness (`Type=notify`): a datagram to $NOTIFY_SOCKET, if set."""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send e.g. `READY=1` or `STOPPING=1`; False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(addr)
            s.sendall(state.encode())
        except OSError:
            return False
    return True
