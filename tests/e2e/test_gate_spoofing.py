"""The host gate against a real container with Docker's default CAP_NET_RAW that
sends raw frames with a source address outside every local bridge subnet (as a
workload of another host would have), with the agent running."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.e2e.stack import Stack, docker, wait_for
from tests.kernel.test_firewall_gate import _RAW

pytestmark = pytest.mark.docker


def _udp_in(cid: str) -> int:
    """Datagrams the container's stack took in (to a port or to none)."""
    lines = docker("exec", cid, "cat", "/proc/net/snmp").splitlines()
    head, vals = (ln.split() for ln in lines if ln.startswith("Udp:"))
    row = dict(zip(head, vals, strict=True))
    return int(row["InDatagrams"]) + int(row["NoPorts"])


def test_a_container_spoofing_an_address_outside_every_subnet_gets_nothing_through(
    stack: Stack,
) -> None:
    """Both containers are unkeyed under `isolate_unkeyed = false` (admitted by the
    gate, no table of their own): only the gate stands between them."""
    stack.start_server()
    stack.start_agent(isolate_unkeyed=False)
    a, b = stack.run("spoofer"), stack.run("target")
    pid = docker("inspect", "-f", "{{.State.Pid}}", a)
    b_ip = stack.ip(b)
    b_mac = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.MacAddress}}{{end}}", b)
    wait_for(lambda: stack.probe_many(a, [(b_ip, 80)]) == {(b_ip, 80): True}, 15, "a -> b")

    def flood(src: str) -> int:
        before = _udp_in(b)
        argv = ["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", _RAW]
        out = subprocess.run(
            [*argv, "eth0", b_mac, src, b_ip, "9000", "0.3"],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
        assert int(out.stdout) > 100
        return _udp_in(b) - before

    assert flood("10.213.7.7") == 0  # a workload address of another host
    assert flood(stack.ip(a)) > 100  # control: its own address goes through
