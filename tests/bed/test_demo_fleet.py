"""`segd demo --hosts 3` end to end: the shop spread over three simulated hosts,
the live cross-host matrix, and nothing left of the bed after Ctrl-C."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import pytest

from segd.bed import leftovers
from tests.hostreq import mesh_missing, require

pytestmark = pytest.mark.bed


def _read_until(p: subprocess.Popen[bytes], marker: str, timeout: float) -> str:
    """The demo's output until `marker` (unbuffered reads: select sees every byte)."""
    assert p.stdout is not None
    fd = p.stdout.fileno()
    out = b""
    deadline = time.monotonic() + timeout
    while marker.encode() not in out:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {marker!r} from the demo:\n{out.decode()}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"the demo ended before {marker!r}:\n{out.decode()}")
            out += chunk
    return out.decode()


def test_the_fleet_demo_shows_the_cross_host_matrix_and_cleans_up_on_ctrl_c() -> None:
    require(mesh_missing())
    p = subprocess.Popen(
        [sys.executable, "-m", "segd", "demo", "--hosts", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=0,
    )
    try:
        out = _read_until(p, "press Ctrl-C", 240)
        assert "the matrix matches the policy (12/12 pairs; 2 allowed" in out, out
        rows = {
            line.split()[0]: line.split()[1:]
            for line in out.splitlines()
            if line.strip().split(" ")[0] in ("web", "api", "db", "intruder")
            and ("ALLOW" in line or "deny" in line)
        }
        assert rows == {
            "web": ["-", "ALLOW", "deny", "deny"],
            "api": ["deny", "-", "ALLOW", "deny"],
            "db": ["deny", "deny", "-", "deny"],
            "intruder": ["deny", "deny", "deny", "-"],
        }, out
        # Each tier on its own host, in that host's mesh subnet; every host's mesh up.
        hosts = [ln.split() for ln in out.splitlines() if ln.strip().startswith("segd-bed-h")]
        assert len(hosts) == 3 and all(h[-1] == "up" for h in hosts), out
        subnets = {h[0][-1]: h[1].rsplit(".", 1)[0] for h in hosts}
        placed = [ln.split() for ln in out.splitlines() if " host " in ln and "10.213." in ln]
        where = {c[0]: (c[2], c[3]) for c in placed}
        assert {n: h for n, (h, _) in where.items()} == {
            "web": "1", "api": "2", "db": "3", "intruder": "1"
        }, out  # fmt: skip
        for name, (host, ip) in where.items():
            assert ip.rsplit(".", 1)[0] == subnets[host], (name, out)
        p.send_signal(signal.SIGINT)
        rest = p.communicate(timeout=120)[0].decode()
        assert p.returncode == 0, out + rest
        assert "cleaning up" in rest
    finally:
        if p.poll() is None:  # a failed check: the demo still cleans up on SIGTERM
            p.terminate()
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert leftovers() == []
