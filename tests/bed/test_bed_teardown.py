"""Teardown of the test bed leaves nothing, also after a crashed run: the CLI
brings a bed up and exits, its engine is SIGKILLed with a container and an agent
running, and a fresh `down` (or the next `up`) still removes every trace."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from segd.bed import Bed, BedError, leftovers
from segd.bed.system import read_pid, read_proc
from tests.hostreq import bed_missing, require

pytestmark = [pytest.mark.docker, pytest.mark.bed]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segd.bed", *args], capture_output=True, text=True, timeout=120
    )


def _gone(pid: int) -> bool:
    """Exited (a zombie its parent has not reaped yet counts)."""
    p = read_proc(pid)
    return p is None or p.zombie


@pytest.fixture
def bed_ready() -> None:
    require(bed_missing())


def test_down_after_a_crash_leaves_nothing_and_is_idempotent(bed_ready: None) -> None:
    up = _cli("up", "--hosts", "1")
    assert up.returncode == 0, up.stderr
    try:
        h = Bed.attach().host(1)
        cid = h.docker("run", "-d", "-p", "8081:80", "segd-busybox:latest", "sleep", "1000")
        workload = int(h.docker("inspect", "-f", "{{.State.Pid}}", cid))
        agent = h.start_agent("http://10.250.0.1:9", "act_unreachable", wait=False)
        lock = f"/run/segd/agent.{os.stat(h.plan.netns_path).st_ino}.lock"
        agent.wait_for(lambda: os.path.exists(lock), 15, "the agent's lock")
        dockerd = read_pid(h.plan.dockerd_pidfile)
        assert dockerd is not None
        os.kill(dockerd, 9)  # the engine crashes: its shim and container stay behind
        assert leftovers() != []
    finally:
        down = _cli("down")
    agent.kill()
    assert down.returncode == 0, down.stderr
    assert down.stdout.startswith("down in ")
    assert leftovers() == []
    assert _gone(workload)
    assert not os.path.exists(lock)
    again = _cli("down")
    assert (again.returncode, leftovers()) == (0, [])
    with pytest.raises(BedError, match="no bed is up"):
        Bed.attach()


def test_up_removes_what_an_earlier_bed_left(bed_ready: None) -> None:
    assert _cli("up", "--hosts", "2", "--no-image").returncode == 0
    old = Bed.attach()
    bed = Bed.up(1, images=())
    try:
        assert [h.name for h in bed.hosts] == ["segd-bed-h1"]
        assert _gone(old.host(1).holder_pid) and _gone(old.host(2).holder_pid)
        assert not os.path.exists(old.host(2).plan.netns_path)
    finally:
        assert bed.down() == []


def test_cli_errors_are_one_line(bed_ready: None) -> None:
    assert _cli("down").returncode == 0
    p = _cli("exec", "1", "--", "true")
    assert (p.returncode, p.stderr.splitlines()) == (
        1,
        ["segd.bed: no bed is up (python -m segd.bed up)"],
    )
    p = _cli("up", "--hosts", "0")
    assert (p.returncode, p.stderr.splitlines()) == (
        1,
        ["segd.bed: hosts: must be between 1 and 32"],
    )
