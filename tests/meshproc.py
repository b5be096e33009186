"""The wireguard-go processes of the mesh tests: found by their network namespace."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def kill_wireguard_go(netns_path: str) -> None:
    """SIGKILL every wireguard-go running in the network namespace at `netns_path`."""
    target = os.stat(netns_path).st_ino
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            net = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
        if comm == "wireguard-go" and net == target:
            os.kill(int(pid), signal.SIGKILL)
