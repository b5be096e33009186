"""One agent per network namespace: agents in different namespaces (simulated
hosts) run side by side, a second one in the same namespace exits with one line."""

from __future__ import annotations

import os
import subprocess
import sys

from segd.agent.hostlock import initial_netns_inode, lock_path_for
from tests.kernel.conftest import MakeNetns

HOLD = (
    "import sys, time\n"
    "from segd.firewall.kernel import take_host_lock\n"
    "from segd.agent.hostlock import host_lock_path\n"
    "take_host_lock(host_lock_path())\n"
    "print(host_lock_path(), flush=True)\n"
    "time.sleep(60)\n"
)


def _hold(netns: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", HOLD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_agents_in_two_namespaces_both_hold_their_lock_a_third_is_refused(
    make_netns: MakeNetns,
) -> None:
    a, b = make_netns("h1"), make_netns("h2")
    ino = {ns.name: os.stat(ns.path).st_ino for ns in (a, b)}
    first, second = _hold(a.name), _hold(b.name)
    try:
        assert first.stdout is not None and second.stdout is not None
        got = [first.stdout.readline().strip(), second.stdout.readline().strip()]
        assert got == [f"/run/segd/agent.{ino[a.name]}.lock", f"/run/segd/agent.{ino[b.name]}.lock"]
        assert lock_path_for(ino[a.name], initial_netns_inode()) == got[0]
        third = _hold(a.name)
        _, err = third.communicate(timeout=30)
        assert third.returncode == 1
        assert err.strip().splitlines() == [
            f"segd agent: another agent is running on this host ({got[0]})"
        ]
        assert first.poll() is None and second.poll() is None
    finally:
        for p in (first, second):
            p.kill()
            p.communicate(timeout=10)
    for path in (f"/run/segd/agent.{i}.lock" for i in ino.values()):
        os.unlink(path)
