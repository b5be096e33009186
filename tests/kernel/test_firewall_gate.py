"""The host gate on a real Linux bridge, proven with real packets.

`gw` plays the host: it owns the bridge (Docker's docker0 / br-*), the gate
table, and a routed link to `out` (the outside world). `c1` and `c2` are
containers on `veth*` ports.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from segd.firewall import Firewall
from tests.kernel.conftest import BridgeLab, Netns, Probe

pytestmark = pytest.mark.kernel

BACKENDS = ["libnftables", "nsenter"]

Path = tuple[str, Netns, str]  # (label, from, to address)


def paths(lab: BridgeLab) -> list[Path]:
    """Every way traffic touches c1, per hook: forward, input, output."""
    out: list[Path] = []
    for fam, (c1, c2, gw, far) in {
        "4": (lab.c1_4, lab.c2_4, lab.gw4, lab.out4),
        "6": (lab.c1_6, lab.c2_6, lab.gw6, lab.out6),
    }.items():
        out += [
            (f"c1->c2/{fam} (forward)", lab.c1, c2),
            (f"c2->c1/{fam} (forward)", lab.c2, c1),
            (f"c1->bridge/{fam} (input)", lab.c1, gw),
            (f"c1->outside/{fam} (input, routed)", lab.c1, far),
            (f"host->c1/{fam} (output)", lab.gw, c1),
            (f"outside->c1/{fam} (output, routed)", lab.out, c1),
        ]
    return out


def reach(ps: list[Path]) -> dict[str, bool]:
    """Ping every path at once; True where the echo came back."""
    with ThreadPoolExecutor(len(ps)) as ex:
        results = ex.map(lambda p: p[1].ping(p[2]), ps)
        return {p[0]: ok for p, ok in zip(ps, results, strict=True)}


def host_gate() -> str:
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    if "table bridge segd_gate" not in out.stdout:
        return ""
    return subprocess.run(
        ["nft", "list", "table", "bridge", "segd_gate"], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize("backend", BACKENDS)
async def test_gate_drops_unenforced_ips_until_they_are_added(
    backend: str, bridge_lab: BridgeLab
) -> None:
    lab = bridge_lab
    ps = paths(lab)
    assert all(reach(ps).values())  # the lab works without a gate

    async with Firewall(backend, gate_ns=lab.gw.path) as fw:  # type: ignore[arg-type]
        await fw.gate_rebuild([], lab.subnets)
        assert not any(reach(ps).values()), reach(ps)

        await fw.gate_add([lab.c1_4, lab.c1_6, lab.c2_4, lab.c2_6])
        assert all(reach(ps).values()), reach(ps)

        await fw.gate_remove([lab.c2_4, lab.c2_6])
        got = reach(ps)
        for label, ok in got.items():
            assert ok == ("c2" not in label), (label, got)
        assert not lab.c2.ping(lab.gw4)

    assert lab.gw4 not in host_gate()  # it went to the gate namespace, not the host


async def test_gate_stops_tcp_too(bridge_lab: BridgeLab) -> None:
    lab = bridge_lab
    lab.c2.serve(tcp=[80])
    lab.gw.serve(tcp=[81])
    probes = [Probe(lab.c2_4, 80), Probe(lab.c2_6, 80), Probe(lab.gw4, 81), Probe(lab.gw6, 81)]
    async with Firewall(gate_ns=lab.gw.path) as fw:
        await fw.gate_rebuild([lab.c2_4, lab.c2_6], lab.subnets)
        assert lab.c1.probe(probes) == ["timeout"] * 4
        await fw.gate_add([lab.c1_4, lab.c1_6])
        assert lab.c1.probe(probes) == ["ok"] * 4


def test_gate_survives_the_agent_being_killed(bridge_lab: BridgeLab) -> None:
    lab = bridge_lab
    code = (
        "import asyncio, os, signal, sys\n"
        "from segd.firewall import Firewall\n"
        "async def main():\n"
        "    fw = Firewall(gate_ns=sys.argv[1])\n"
        "    await fw.start()\n"
        "    await fw.gate_rebuild([sys.argv[2]], sys.argv[3:])\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    argv = [sys.executable, "-c", code, lab.gw.path, lab.c2_4, *lab.subnets]
    proc = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert proc.returncode == -9, proc.stderr
    assert "allowed4" in lab.gw.nft("list", "table", "bridge", "segd_gate")
    assert not lab.c1.ping(lab.c2_4)
    assert not lab.c1.ping(lab.gw4)
    assert lab.c2.ping(lab.gw4)


async def test_gate_rebuild_never_lets_a_packet_through(bridge_lab: BridgeLab) -> None:
    """Rebuild the gate over and over under a flood from an unenforced IP."""
    lab = bridge_lab
    received = lab.c2.count_input(9999)
    async with Firewall(gate_ns=lab.gw.path) as fw:
        await fw.gate_rebuild([lab.c2_4], lab.subnets)
        sender = lab.c1.flood_udp(lab.c2_4, 9999, 2.0)
        rebuilds = 0
        while sender.poll() is None:
            allowed = [lab.c2_4] if rebuilds % 2 else [lab.c2_4, "10.213.1.99"]
            await fw.gate_rebuild(allowed, lab.subnets)
            rebuilds += 1
        assert sender.stdout is not None
        sent = int(sender.stdout.read())
        assert rebuilds > 20 and sent > 1000
        assert received() == 0

        # Control: the same flood does arrive once c1 is let through.
        await fw.gate_add([lab.c1_4])
        lab.c1.flood_udp(lab.c2_4, 9999, 0.2).wait(timeout=30)
        assert received() > 0


async def test_gate_rebuild_replaces_a_table_that_is_not_ours(bridge_lab: BridgeLab) -> None:
    lab = bridge_lab
    lab.gw.nft(
        "add table bridge segd_gate; add set bridge segd_gate allowed4 { type ipv4_addr;"
        " flags interval; }; add chain bridge segd_gate junk"
    )
    async with Firewall(gate_ns=lab.gw.path) as fw:
        await fw.gate_rebuild([lab.c2_4], lab.subnets)
        listing = await fw.gate_list()
    assert listing is not None and "junk" not in listing
    assert lab.gw.nft("list", "tables").count("segd_gate") == 1  # no shadow left behind
    assert not lab.c1.ping(lab.c2_4)
    assert lab.c2.ping(lab.gw4)


async def test_gate_subnets_scope_the_gate(bridge_lab: BridgeLab) -> None:
    lab = bridge_lab
    async with Firewall(gate_ns=lab.gw.path) as fw:
        await fw.gate_rebuild([], ["10.213.200.0/24"])  # not the lab's bridge
        assert lab.c1.ping(lab.c2_4)
        await fw.gate_set_subnets([*lab.subnets, "10.213.200.0/24"])
        assert not lab.c1.ping(lab.c2_4)
        assert not lab.c1.ping(lab.c2_6)
        listing = await fw.gate_list()
        assert listing is not None and "10.213.1.0/24" in listing


async def test_gate_add_and_remove_are_idempotent(bridge_lab: BridgeLab) -> None:
    lab = bridge_lab
    async with Firewall(gate_ns=lab.gw.path) as fw:
        assert await fw.gate_list() is None
        await fw.gate_rebuild([lab.c1_4], lab.subnets)
        await fw.gate_add([lab.c1_4, lab.c2_6])
        await fw.gate_add([lab.c1_4, lab.c2_6])
        await fw.gate_remove(["10.213.1.77", lab.c2_6])  # one of them was never there
        await fw.gate_remove([lab.c2_6])
        await fw.gate_add([])
        await fw.gate_remove([])
        listing = await fw.gate_list()
    assert listing is not None
    assert f"elements = {{ {lab.c1_4} }}" in listing
    assert lab.c2_6 not in listing and "10.213.1.77" not in listing


async def test_backends_list_the_gate_alike(bridge_lab: BridgeLab) -> None:
    lab = bridge_lab
    gw = lab.gw.path
    async with Firewall("libnftables", gate_ns=gw) as lib, Firewall("nsenter", gate_ns=gw) as cli:
        await cli.gate_rebuild([lab.c1_4, lab.c2_6], lab.subnets)
        first = await lib.gate_list()
        assert first is not None
        assert first == await cli.gate_list()
        await lib.gate_rebuild([lab.c1_4, lab.c2_6], lab.subnets)
        assert await cli.gate_list() == first
