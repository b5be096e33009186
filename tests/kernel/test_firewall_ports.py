"""`Firewall.ports`: a container's addresses and the bridge ports they live behind.

On the bridge lab (the gate's namespace is `gw`) and on a real Docker container
(the gate's namespace is the host's).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from segd.firewall.kernel import Firewall, NamespaceGone, NsRef
from tests.kernel.conftest import BridgeLab, MakeNetns, Netns, _veth

pytestmark = pytest.mark.kernel

IMAGE = "segd-busybox:latest"
LABEL = "segd.kernel-test"  # not the e2e tier's label: its clean-up must not take ours


def ref(ns: Netns) -> NsRef:
    return NsRef(ns.name, ns.path)


async def test_ports_map_each_address_to_the_gate_side_veth(
    bridge_lab: BridgeLab, make_netns: MakeNetns
) -> None:
    lab = bridge_lab
    c1, gw = lab.c1, lab.gw
    c1.ip("addr", "add", "169.254.7.7/16", "dev", "eth0")  # link-local: skipped
    # A second network: another veth into the gate's namespace.
    _veth("veth7", gw, c1, "eth1")
    c1.ip("addr", "add", "10.213.5.11/24", "dev", "eth1")
    c1.ip("addr", "add", "fd10:213:5::11/64", "dev", "eth1", "nodad")
    # Not bridge ports, each with an address that must not show up:
    # a veth pair with both ends in the container;
    c1.ip("link", "add", "vethin0", "type", "veth", "peer", "name", "vethin1")
    c1.ip("addr", "add", "10.213.6.1/24", "dev", "vethin0")
    # a macvlan whose parent (IFLA_LINK) is in the gate's namespace, named like a port;
    gw.ip("link", "add", "vethparent", "type", "veth", "peer", "name", "parentpeer")
    gw.ip("link", "add", "mv0", "link", "vethparent", "type", "macvlan")
    gw.ip("link", "set", "mv0", "netns", c1.name)
    c1.ip("addr", "add", "10.213.7.1/24", "dev", "mv0")
    # a veth whose peer is in another namespace than the gate's;
    _veth("vethout", lab.out, c1, "eth2")
    c1.ip("addr", "add", "10.213.8.1/24", "dev", "eth2")
    # a veth into the gate's namespace under a name the gate does not look at.
    _veth("tap-c1", gw, c1, "eth3")
    c1.ip("addr", "add", "10.213.9.1/24", "dev", "eth3")
    for dev in ("eth1", "eth2", "eth3", "vethin0", "vethin1", "mv0"):
        c1.ip("link", "set", dev, "up")

    async with Firewall(gate_ns=gw.path) as fw:
        assert await fw.ports(ref(c1)) == {
            lab.c1_4: "veth1",
            lab.c1_6: "veth1",
            "10.213.5.11": "veth7",
            "fd10:213:5::11": "veth7",
        }
        assert await fw.ports(ref(lab.c2)) == {lab.c2_4: "veth2", lab.c2_6: "veth2"}
        assert await fw.ports(ref(lab.out)) == {}  # its peer, up0, is no veth* port
        assert await fw.ports(ref(gw)) == {}  # the gate's own: its veths' peers are elsewhere
        assert await fw.ports(ref(make_netns("empty"))) == {}
        assert fw.open_namespaces == 0  # no nftables endpoint was made

    # With the gate in the host's namespace, the lab's ports are not gate ports.
    async with Firewall() as fw:
        assert await fw.ports(ref(c1)) == {}


async def test_ports_of_a_vanished_namespace_raise(make_netns: MakeNetns) -> None:
    ns = make_netns("gone")
    ns.delete()
    async with Firewall() as fw:
        with pytest.raises(NamespaceGone):
            await fw.ports(ref(ns))
        assert await fw.ports(NsRef("self", "/proc/self/ns/net")) is not None  # still works


def _docker(*args: str) -> str:
    docker = shutil.which("docker") or "docker"
    proc = subprocess.run([docker, *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


@pytest.fixture
def container() -> Iterator[str]:
    """A running container on Docker's default bridge; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    try:
        _docker("image", "inspect", IMAGE)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"needs a running Docker engine with {IMAGE}: {e}")
    cid = _docker("run", "-d", "--label", f"{LABEL}=1", IMAGE, "sleep", "1000")
    try:
        yield cid
    finally:
        subprocess.run(
            [shutil.which("docker") or "docker", "rm", "-f", cid],
            capture_output=True,
            timeout=60,
            check=False,
        )


def port_by_iproute2(pid: int) -> str:
    """The container's eth0 -> its peer's index -> the name of that link here."""
    inside = subprocess.run(
        ["nsenter", "-t", str(pid), "-n", "ip", "-j", "link", "show", "eth0"],
        capture_output=True,
        text=True,
        check=True,
    )
    peer_index = json.loads(inside.stdout)[0]["link_index"]
    here = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True)
    name: str = next(
        link["ifname"] for link in json.loads(here.stdout) if link["ifindex"] == peer_index
    )
    return name


@pytest.mark.docker
async def test_ports_of_a_docker_container(container: str) -> None:
    info = json.loads(_docker("inspect", container))[0]
    pid = info["State"]["Pid"]
    ips = {n["IPAddress"] for n in info["NetworkSettings"]["Networks"].values()} - {""}
    ips |= {n["GlobalIPv6Address"] for n in info["NetworkSettings"]["Networks"].values()} - {""}
    assert ips
    port = port_by_iproute2(pid)
    assert port.startswith("veth")

    async with Firewall() as fw:  # the gate's namespace is the host's; nothing is applied
        t0 = time.perf_counter()
        got = await fw.ports(NsRef(container, f"/proc/{pid}/ns/net"))
        elapsed = time.perf_counter() - t0
    assert got == dict.fromkeys(ips, port)
    assert elapsed < 0.5
