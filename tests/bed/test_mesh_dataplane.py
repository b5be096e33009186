"""The segd mesh's data plane on the test bed: three simulated Docker hosts, each
given its mesh the way an agent applies the mesh of its instructions
(`mesh_apply.py`), containers on the `segd` network, real packets, and captures
on the underlay bridge."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from segd.bed import IMAGE, Bed, BedHost
from segd.bed.plan import BRIDGE
from tests.e2e.stack import wait_for
from tests.hostreq import mesh_missing, require
from tests.kernel.test_firewall_gate import _RAW
from tests.meshproc import kill_wireguard_go

pytestmark = pytest.mark.bed


@pytest.fixture(scope="module", autouse=True)
def _mesh_tools() -> None:
    require(mesh_missing())


BED_HOSTS = 3
POOL = "10.213.0.0/16"
HELPER = str(Path(__file__).with_name("mesh_apply.py"))
PORT = 8080


def subnet(i: int) -> str:
    return f"10.213.{i}.0/24"


def first(i: int) -> str:
    """The first container's address on host i's segd network."""
    return f"10.213.{i}.2"


@dataclass
class Fleet:
    bed: Bed
    state: dict[int, Path]
    keys: dict[int, str]

    def apply(self, h: BedHost) -> dict[str, object]:
        peers = [
            {
                "host_id": f"h{o.index}",
                "public_key": self.keys[o.index],
                "endpoint": f"{o.address}:51820",
                "subnet": subnet(o.index),
            }
            for o in self.bed.hosts
            if o.index != h.index
        ]
        mesh = {"pool": POOL, "subnet": subnet(h.index), "peers": peers}
        out = h.run(
            sys.executable, HELPER, str(self.state[h.index]), h.docker_url, json.dumps(mesh)
        )
        return json.loads(out.stdout.splitlines()[-1])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def fleet(bed: Bed) -> Iterator[Fleet]:
    with tempfile.TemporaryDirectory(prefix="segd-mesh-") as tmp:
        state = {h.index: Path(tmp) / h.name for h in bed.hosts}
        keys = {
            h.index: h.run(
                sys.executable, HELPER, str(state[h.index]), h.docker_url, "key"
            ).stdout.strip()
            for h in bed.hosts
        }
        f = Fleet(bed, state, keys)
        for h in bed.hosts:
            got = f.apply(h)
            assert got["peers"] == BED_HOSTS - 1 and got["gateway"] == f"10.213.{h.index}.1"
        for h in bed.hosts:  # the first container on each host: a listener
            h.docker(
                "run", "-d", "--name", "srv", "--network", "segd", IMAGE,
                "httpd", "-f", "-p", str(PORT), "-h", "/",
            )  # fmt: skip
            addr = h.docker("inspect", "-f", "{{.NetworkSettings.Networks.segd.IPAddress}}", "srv")
            assert addr == first(h.index)
        yield f
        for h in bed.hosts:
            h.docker("rm", "-f", "srv", check=False)


class Capture:
    """tcpdump on the underlay bridge (root namespace) until `stop`; its lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ["tcpdump", "-i", BRIDGE, "-n", "-U", "--immediate-mode", "-w", str(path), "ip"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)  # tcpdump has its socket open

    def stop(self) -> list[str]:
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        out = subprocess.run(
            ["tcpdump", "-n", "-r", str(self.path)], capture_output=True, text=True, check=True
        )
        return out.stdout.splitlines()


def in_clear(lines: list[str]) -> list[str]:
    """Captured IPv4 packets that are not WireGuard between the hosts' port 51820 (nor
    the ICMP error a host whose WireGuard is gone answers it with)."""
    return [
        ln
        for ln in lines
        if not (".51820 > " in ln and ".51820: UDP" in ln)
        and "udp port 51820 unreachable" not in ln
    ]


def sender(h: BedHost, name: str = "cli") -> str:
    h.docker("rm", "-f", name, check=False)
    return h.docker("run", "-d", "--name", name, "--network", "segd", IMAGE, "sleep", "1000")


def test_a_container_reaches_another_hosts_container_by_its_mesh_address(fleet: Fleet) -> None:
    """Every ordered pair of hosts, through WireGuard; the underlay sees only UDP 51820."""
    hosts = fleet.bed.hosts
    for h in hosts:
        sender(h)
    cap = Capture(fleet.state[1].parent / "reach.pcap")
    try:
        got = {
            (h.index, o.index): h.probe("cli", [(first(o.index), PORT)], wait=3)[
                (first(o.index), PORT)
            ]
            for h in hosts
            for o in hosts
            if o is not h
        }
    finally:
        lines = cap.stop()
    assert all(got.values()), got
    assert any(".51820 > " in ln for ln in lines), lines[:5]
    assert in_clear(lines) == [], in_clear(lines)[:10]


def test_the_receiver_sees_the_senders_own_address(fleet: Fleet) -> None:
    h1, h2 = fleet.bed.host(1), fleet.bed.host(2)
    cid = sender(h2)
    me = h2.docker("inspect", "-f", "{{.NetworkSettings.Networks.segd.IPAddress}}", cid)
    hold = h2.popen(
        [
            "docker", "-H", h2.docker_url, "exec", "cli", "sh", "-c",
            f"sleep 4 | nc {first(1)} {PORT}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def peers() -> list[str]:
            out = h1.docker("exec", "srv", "netstat", "-tn")
            return [ln.split()[4] for ln in out.splitlines() if f":{PORT} " in ln]

        seen = wait_for(peers, 5, "the connection on host 1")
        assert [p.rsplit(":", 1)[0].removeprefix("::ffff:") for p in seen] == [me]
        assert me.startswith("10.213.2.")  # not host 2's underlay or bridge address
    finally:
        hold.kill()
        hold.wait()


def test_the_outside_is_reached_masqueraded(fleet: Fleet) -> None:
    """Docker's masquerade is off for the segd network; segd's own applies outside
    the pool: the root namespace sees host 2's underlay address."""
    h2 = fleet.bed.host(2)
    sender(h2)
    cap = Capture(fleet.state[2].parent / "outside.pcap")
    try:
        h2.docker("exec", "cli", "ping", "-c", "1", "-W", "2", fleet.bed.root_address)
    finally:
        lines = cap.stop()
    icmp = [ln for ln in lines if "ICMP echo request" in ln]
    assert icmp and all(f"IP {h2.address} > {fleet.bed.root_address}" in ln for ln in icmp), lines


def _udp_in(h: BedHost, container: str) -> int:
    """Datagrams the container's stack took in (to a port or to none)."""
    lines = h.docker("exec", container, "cat", "/proc/net/snmp").splitlines()
    head, vals = (ln.split() for ln in lines if ln.startswith("Udp:"))
    row = dict(zip(head, vals, strict=True))
    return int(row["InDatagrams"]) + int(row["NoPorts"])


def test_another_host_cannot_send_as_host_1s_containers(fleet: Fleet) -> None:
    """Host 3 claims host 1's subnet: through WireGuard (cryptokey routing drops it at
    host 2) and in clear on the underlay (dropped before the container: host 2 takes a
    pool source only from its WireGuard interface)."""
    h2, h3 = fleet.bed.host(2), fleet.bed.host(3)
    spoofed = "10.213.1.77"
    h3.run("ip", "addr", "add", f"{spoofed}/32", "dev", "lo")
    try:
        # Control: host 3's own bridge address goes through.
        ping = ("busybox", "ping", "-c", "1", "-W", "2", "-I")
        assert h3.run(*ping, "10.213.3.1", first(2), check=False).returncode == 0
        assert h3.run(*ping, spoofed, first(2), check=False).returncode != 0
    finally:
        h3.run("ip", "addr", "del", f"{spoofed}/32", "dev", "lo", check=False)

    mac = h3.run("ip", "neigh", "show", h2.address).stdout.split()
    if "lladdr" not in mac:
        h3.run("busybox", "ping", "-c", "1", "-W", "1", h2.address)
        mac = h3.run("ip", "neigh", "show", h2.address).stdout.split()
    h2_mac = mac[mac.index("lladdr") + 1]
    before = _udp_in(h2, "srv")
    flood = h3.run(
        sys.executable, "-c", _RAW, "eth0", h2_mac, "10.213.1.5", first(2), "9000", "0.3"
    )
    assert int(flood.stdout) > 100
    assert _udp_in(h2, "srv") == before


def _kill_wireguard_go(h: BedHost) -> None:
    kill_wireguard_go(h.plan.netns_path)


def test_wireguard_go_killed_drops_the_traffic_and_nothing_goes_in_clear(fleet: Fleet) -> None:
    h1, h2 = fleet.bed.host(1), fleet.bed.host(2)
    sender(h2)
    target = (first(1), PORT)
    assert h2.probe("cli", [target], wait=3)[target]
    _kill_wireguard_go(h2)
    wait_for(lambda: "segd-wg" not in h2.run("ip", "link", "show").stdout, 10, "the TUN gone")
    cap = Capture(fleet.state[2].parent / "killed.pcap")
    try:
        got = [h2.probe("cli", [target], wait=2)[target] for _ in range(3)]
        back = h1.probe("srv", [(first(2), PORT)], wait=2)[(first(2), PORT)]
    finally:
        lines = cap.stop()
    assert got == [False] * 3 and not back
    assert in_clear(lines) == [], in_clear(lines)[:10]

    # Applied again (what the agent's periodic check does), the path comes back.
    fleet.apply(h2)
    probe: Callable[[], bool] = lambda: h2.probe("cli", [target], wait=2)[target]  # noqa: E731
    wait_for(probe, 40, "the mesh back after wireguard-go restarted")
