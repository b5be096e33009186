"""The host gate on a real Linux bridge, proven with real packets.

`gw` plays the host: it owns the bridge (Docker's docker0 / br-*), the gate
table, and a routed link to `out` (the outside world). `c1` and `c2` are
containers on `veth*` ports.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path as FilePath

import pytest
import structlog

from segd.agent import bootgate
from segd.firewall import gate
from segd.firewall.kernel import Firewall, NsRef
from tests.kernel.conftest import BridgeLab, MakeNetns, Netns, Probe, attach

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


async def rebuild(fw: Firewall, entries: list[tuple[str, str]], subnets: Sequence[str]) -> None:
    """What the agent does to make the gate exactly this."""
    await fw.gate_apply(gate.render_gate(entries, subnets))


async def admit(fw: Firewall, entries: list[tuple[str, str]]) -> None:
    plan = gate.render_gate_add(entries)
    assert plan is not None
    await fw.gate_apply(plan)


async def revoke(fw: Firewall, entries: list[tuple[str, str]]) -> None:
    plan = gate.render_gate_remove(entries)
    assert plan is not None
    await fw.gate_apply(plan)


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
        await rebuild(fw, [], lab.subnets)
        assert not any(reach(ps).values()), reach(ps)

        await admit(fw, lab.entries)
        lab.forget_neighbours()
        assert all(reach(ps).values()), reach(ps)

        await revoke(fw, [("veth2", lab.c2_4), ("veth2", lab.c2_6)])
        got = reach(ps)
        for label, ok in got.items():
            assert ok == ("c2" not in label), (label, got)
        assert not lab.c2.ping(lab.gw4)

    assert lab.gw4 not in host_gate()  # it went to the gate namespace, not the host


async def test_the_boot_gate_keeps_every_container_dark_until_admitted(
    bridge_lab: BridgeLab,
) -> None:
    """At boot no gate is there and Docker starts containers before the agent:
    `segd boot-gate` admits nothing and guards every destination; a gate in
    place is left as it is; the agent's first rebuild admits its containers."""
    lab = bridge_lab
    ps = paths(lab)
    assert all(reach(ps).values())
    assert await bootgate.load(gate_ns=lab.gw.path)
    assert not any(reach(ps).values()), reach(ps)
    assert not await bootgate.load(gate_ns=lab.gw.path)  # there: left as it is
    async with Firewall(gate_ns=lab.gw.path) as fw:
        await rebuild(fw, lab.entries, lab.subnets)  # the agent, its tables in place
    lab.forget_neighbours()
    assert all(reach(ps).values()), reach(ps)


async def test_gate_stops_tcp_too(bridge_lab: BridgeLab) -> None:
    lab = bridge_lab
    lab.c2.serve(tcp=[80])
    lab.gw.serve(tcp=[81])
    probes = [Probe(lab.c2_4, 80), Probe(lab.c2_6, 80), Probe(lab.gw4, 81), Probe(lab.gw6, 81)]
    async with Firewall(gate_ns=lab.gw.path) as fw:
        await rebuild(fw, [("veth2", lab.c2_4), ("veth2", lab.c2_6)], lab.subnets)
        assert lab.c1.probe(probes) == ["timeout"] * 4
        await admit(fw, [("veth1", lab.c1_4), ("veth1", lab.c1_6)])
        assert lab.c1.probe(probes) == ["ok"] * 4


def test_gate_survives_the_agent_being_killed(bridge_lab: BridgeLab) -> None:
    lab = bridge_lab
    code = (
        "import asyncio, os, signal, sys\n"
        "from segd.firewall.gate import render_gate\n"
        "from segd.firewall.kernel import Firewall\n"
        "async def main():\n"
        "    fw = Firewall(gate_ns=sys.argv[1])\n"
        "    await fw.start()\n"
        "    await fw.gate_apply(render_gate([(sys.argv[2], sys.argv[3])], sys.argv[4:]))\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )
    argv = [sys.executable, "-c", code, lab.gw.path, "veth2", lab.c2_4, *lab.subnets]
    proc = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    assert proc.returncode == -9, proc.stderr
    assert "allowed4" in lab.gw.nft("list", "table", "bridge", "segd_gate")
    assert not lab.c1.ping(lab.c2_4)
    assert not lab.c1.ping(lab.gw4)
    assert lab.c2.ping(lab.gw4)


async def rebuild_under_flood(
    lab: BridgeLab, rebuild: Callable[[list[tuple[str, str]]], Awaitable[None]]
) -> Callable[[], int]:
    """Flood c2 from unenforced c1 while `rebuild` runs over and over (with and without
    an extra entry); nothing may arrive. Returns c2's counter of the flood's port."""
    received = lab.c2.count_input(9999)
    sender = lab.c1.flood_udp(lab.c2_4, 9999, 2.0)
    rebuilds = 0
    while sender.poll() is None:
        admitted = [("veth2", lab.c2_4)]
        if rebuilds % 2:
            admitted.append(("veth9", "10.213.1.99"))
        await rebuild(admitted)
        rebuilds += 1
    assert sender.stdout is not None
    sent = int(sender.stdout.read())
    assert rebuilds > 20 and sent > 1000
    assert received() == 0
    return received


async def test_gate_rebuild_never_lets_a_packet_through(bridge_lab: BridgeLab) -> None:
    """Rebuild the gate over and over under a flood from an unenforced IP."""
    lab = bridge_lab
    async with Firewall(gate_ns=lab.gw.path) as fw:
        await rebuild(fw, [("veth2", lab.c2_4)], lab.subnets)
        received = await rebuild_under_flood(lab, lambda a: rebuild(fw, a, lab.subnets))

        # Control: the same flood does arrive once c1 is let through.
        await admit(fw, [("veth1", lab.c1_4)])
        lab.c1.flood_udp(lab.c2_4, 9999, 0.2).wait(timeout=30)
        assert received() > 0


async def test_gate_replace_never_lets_a_packet_through(bridge_lab: BridgeLab) -> None:
    """The fallback (delete and re-create the table) under a flood from an unenforced IP."""
    lab = bridge_lab
    async with Firewall(gate_ns=lab.gw.path) as fw:
        await rebuild(fw, [("veth2", lab.c2_4)], lab.subnets)
        # What gate_rebuild falls back to when the table is not of our shape.
        await rebuild_under_flood(
            lab, lambda a: fw.gate_apply(gate.render_gate_replace(a, lab.subnets))
        )
    assert lab.gw.nft("list", "tables").count("segd_gate") == 1  # no shadow left behind


async def test_gate_rebuild_replaces_a_table_that_is_not_ours(bridge_lab: BridgeLab) -> None:
    lab = bridge_lab
    lab.gw.nft(
        "add table bridge segd_gate; add set bridge segd_gate allowed4 { type ipv4_addr;"
        " flags interval; }; add chain bridge segd_gate junk"
    )
    async with Firewall(gate_ns=lab.gw.path) as fw:
        await rebuild(fw, [("veth2", lab.c2_4)], lab.subnets)
        listing = await fw.gate_list()
    assert listing is not None and "junk" not in listing
    assert lab.gw.nft("list", "tables").count("segd_gate") == 1  # no shadow left behind
    assert not lab.c1.ping(lab.c2_4)
    assert lab.c2.ping(lab.gw4)


def ip_only_gate(allowed4: list[str], allowed6: list[str], subnets4: str, subnets6: str) -> str:
    """The gate as earlier versions wrote it: addresses only, on any port."""

    def drops(port: str, side: str) -> str:
        return (
            f'{port} "veth*" ip {side} @subnets4 ip {side} != @allowed4 drop\n'
            f'{port} "veth*" ip6 {side} @subnets6 ip6 {side} != @allowed6 drop\n'
        )

    ins, outs = drops("iifname", "saddr"), drops("oifname", "daddr")
    head = "type filter hook {} priority -200; policy accept;\n"
    return (
        "table bridge segd_gate {\n"
        f"set allowed4 {{ type ipv4_addr; elements = {{ {', '.join(allowed4)} }}; }}\n"
        f"set allowed6 {{ type ipv6_addr; elements = {{ {', '.join(allowed6)} }}; }}\n"
        f"set subnets4 {{ type ipv4_addr; flags interval; elements = {{ {subnets4} }}; }}\n"
        f"set subnets6 {{ type ipv6_addr; flags interval; elements = {{ {subnets6} }}; }}\n"
        f"chain forward {{\n{head.format('forward')}{ins}{outs}}}\n"
        f"chain input {{\n{head.format('input')}{ins}}}\n"
        f"chain output {{\n{head.format('output')}{outs}}}\n"
        "}\n"
    )


def spoofer(lab: BridgeLab, x: Netns, port: str, addr: str) -> None:
    """Put `x` on the bridge behind `port`, holding `addr` (someone else's address).

    Its neighbours are pinned and it answers no ARP, so it cannot disturb how
    the others resolve `addr`: only the frames it sends with `addr` as source
    reach anyone.
    """
    attach(lab, x, port)
    x.ip("link", "set", "eth0", "arp", "off")
    x.ip("addr", "add", f"{addr}/24", "dev", "eth0")
    x.pin_neighbour(lab.c2_4, lab.c2.mac("eth0"), "eth0")
    x.pin_neighbour(lab.gw4, lab.gw.mac(lab.bridge), "eth0")


def spoofed(lab: BridgeLab, x: Netns, src: str) -> dict[str, int]:
    """Flood c2 and the bridge address from `x` with source `src`; what each received."""
    to_c2, to_gw = lab.c2.count_input(9001), lab.gw.count_input(9002)
    before = {"c2": to_c2(), "bridge": to_gw()}
    floods = [x.flood_udp(lab.c2_4, 9001, 0.3, src), x.flood_udp(lab.gw4, 9002, 0.3, src)]
    for f in floods:
        f.wait(timeout=30)
        assert f.stdout is not None and int(f.stdout.read()) > 100
    return {"c2": to_c2() - before["c2"], "bridge": to_gw() - before["bridge"]}


async def test_gate_rebuild_upgrades_an_ip_only_gate(
    bridge_lab: BridgeLab, make_netns: MakeNetns, tmp_path: FilePath
) -> None:
    lab = bridge_lab
    old = tmp_path / "old.nft"
    old.write_text(ip_only_gate([lab.c1_4, lab.c2_4], [lab.c1_6, lab.c2_6], *lab.subnets))
    lab.gw.nft("-f", str(old))
    x = make_netns("x")
    spoofer(lab, x, "veth3", lab.c1_4)
    # The hole: the IP-only gate admits c1's address from any port.
    got = spoofed(lab, x, lab.c1_4)
    assert got["c2"] > 0 and got["bridge"] > 0, got

    async with Firewall(gate_ns=lab.gw.path) as fw:
        with structlog.testing.capture_logs() as logs:
            await rebuild(fw, lab.entries, lab.subnets)
        listing = await fw.gate_list()
    warned = [
        (e["event"], e.get("plan"), e.get("fallback")) for e in logs if e["log_level"] == "warning"
    ]
    assert warned == [("firewall.fallback", "gate", "gate_replace")]
    assert listing is not None
    assert "type ifname . ipv4_addr" in listing and "type ifname . ipv6_addr" in listing
    assert f'"veth1" . {lab.c1_4}' in listing and f'"veth2" . {lab.c2_6}' in listing
    assert lab.gw.nft("list", "tables").count("segd_gate") == 1  # no shadow left behind
    assert spoofed(lab, x, lab.c1_4) == {"c2": 0, "bridge": 0}
    assert all(reach(paths(lab)).values())


@pytest.mark.parametrize("fam", ["4", "6"])
async def test_an_admitted_address_behind_another_port_is_dropped(
    fam: str, bridge_lab: BridgeLab, make_netns: MakeNetns
) -> None:
    """Spoofing: `x`, on port veth3, takes c1's address, which the gate admits on veth1."""
    lab = bridge_lab
    c1, c2, gw = (lab.c1_4, lab.c2_4, lab.gw4) if fam == "4" else (lab.c1_6, lab.c2_6, lab.gw6)
    x = make_netns("x")
    attach(lab, x, "veth3")
    async with Firewall(gate_ns=lab.gw.path) as fw:
        await rebuild(fw, lab.entries, lab.subnets)
        # The right port passes, every way: to c2, the bridge, the outside and back.
        assert all(reach(paths(lab)).values()), reach(paths(lab))

        # The attack. Neighbours are pinned so each frame takes the port under test:
        # x -> c2 and x -> bridge leave through veth3 with c1's address as source;
        # c2's and the host's frames to c1's address go to x's MAC, out of veth3.
        x.ip("addr", "add", f"{c1}/{64 if fam == '6' else 24}", "dev", "eth0", "nodad")
        x.pin_neighbour(c2, lab.c2.mac("eth0"), "eth0")
        x.pin_neighbour(gw, lab.gw.mac(lab.bridge), "eth0")
        x_mac = x.mac("eth0")
        lab.c2.pin_neighbour(c1, x_mac, "eth0")
        lab.gw.pin_neighbour(c1, x_mac, lab.bridge)
        lab.gw.run("bridge", "fdb", "replace", x_mac, "dev", "veth3", "master", "static")
        counters = {
            "x->c2 (forward)": lab.c2.count_input(9001),
            "x->bridge (input)": lab.gw.count_input(9002),
            "c2->x (forward, reply direction)": x.count_input(9003),
            "host->x (output, reply direction)": x.count_input(9004),
        }

        def flood() -> dict[str, int]:
            before = {k: count() for k, count in counters.items()}
            floods = [
                x.flood_udp(c2, 9001, 0.3, c1),
                x.flood_udp(gw, 9002, 0.3, c1),
                lab.c2.flood_udp(c1, 9003, 0.3),
                lab.gw.flood_udp(c1, 9004, 0.3),
            ]
            for f in floods:
                f.wait(timeout=30)
                assert f.stdout is not None and int(f.stdout.read()) > 100
            return {k: count() - before[k] for k, count in counters.items()}

        got = flood()
        assert got == dict.fromkeys(counters, 0), got

        # Control: the same frames arrive once the address is admitted on x's port.
        await admit(fw, [("veth3", c1)])
        got = flood()
        assert all(n > 0 for n in got.values()), got


async def test_a_reused_address_behind_a_new_port_stays_dark(
    bridge_lab: BridgeLab, make_netns: MakeNetns
) -> None:
    """The agent is down; c1 dies; a newcomer gets c1's addresses on a new port."""
    lab = bridge_lab
    async with Firewall(gate_ns=lab.gw.path) as fw:
        await rebuild(fw, lab.entries, lab.subnets)
    assert lab.c2.ping(lab.c1_4) and lab.c2.ping(lab.c1_6)

    lab.c1.delete()  # and with it both ends of veth1
    deadline = time.monotonic() + 10
    while "veth1" in lab.gw.link_names():
        assert time.monotonic() < deadline, "veth1 outlived its namespace"
        await asyncio.sleep(0.01)
    new = make_netns("new")
    attach(lab, new, "veth4", (lab.c1_4, lab.c1_6))
    lab.forget_neighbours()  # c1's MAC
    stale = lab.gw.nft("list", "set", "bridge", "segd_gate", "allowed4")
    assert f'"veth1" . {lab.c1_4}' in stale  # nobody cleaned up

    ps: list[Path] = []
    for fam, (me, c2, gw, far) in {
        "4": (lab.c1_4, lab.c2_4, lab.gw4, lab.out4),
        "6": (lab.c1_6, lab.c2_6, lab.gw6, lab.out6),
    }.items():
        ps += [
            (f"new->c2/{fam}", new, c2),
            (f"c2->new/{fam}", lab.c2, me),
            (f"new->bridge/{fam}", new, gw),
            (f"new->outside/{fam}", new, far),
            (f"host->new/{fam}", lab.gw, me),
            (f"outside->new/{fam}", lab.out, me),
        ]
    got = reach(ps)
    assert not any(got.values()), got

    # Control: the newcomer's own entries let it through.
    async with Firewall(gate_ns=lab.gw.path) as fw:
        await admit(fw, [("veth4", lab.c1_4), ("veth4", lab.c1_6)])
    lab.forget_neighbours(new)
    got = reach(ps)
    assert all(got.values()), got


async def test_entries_from_ports_admit_the_containers(bridge_lab: BridgeLab) -> None:
    lab = bridge_lab
    async with Firewall(gate_ns=lab.gw.path) as fw:
        await rebuild(fw, [], lab.subnets)
        assert not any(reach(paths(lab)).values())
        entries = []
        for c in (lab.c1, lab.c2):
            found = await fw.ports(NsRef(c.name, c.path))
            entries += [(port, ip) for ip, port in found.items()]
        assert sorted(entries) == sorted(lab.entries)
        await admit(fw, entries)
        lab.forget_neighbours()
        assert all(reach(paths(lab)).values())


async def test_gate_subnets_scope_the_guarded_destinations(bridge_lab: BridgeLab) -> None:
    """Sources are bound everywhere; the subnets say which destinations are guarded:
    the host's frames to an unadmitted container pass while its subnet is not one."""
    lab = bridge_lab
    lab.gw.pin_neighbour(lab.c2_6, lab.c2.mac("eth0"), lab.bridge)
    counts = {lab.c2_4: lab.c2.count_input(9005), lab.c2_6: lab.c2.count_input(9006)}

    def flood() -> dict[str, int]:
        before = {ip: count() for ip, count in counts.items()}
        for ip, port in ((lab.c2_4, 9005), (lab.c2_6, 9006)):
            assert lab.gw.flood_udp(ip, port, 0.3).wait(timeout=30) == 0
        return {ip: count() - before[ip] for ip, count in counts.items()}

    async with Firewall(gate_ns=lab.gw.path) as fw:
        await rebuild(fw, [], ["10.213.200.0/24"])  # not the lab's bridge
        got = flood()
        assert all(n > 0 for n in got.values()), got
        await fw.gate_apply(gate.render_gate_subnets([*lab.subnets, "10.213.200.0/24"]))
        got = flood()
        assert got == dict.fromkeys(counts, 0), got
        assert not lab.c1.ping(lab.c2_4)
        listing = await fw.gate_list()
        assert listing is not None and "10.213.1.0/24" in listing


async def test_gate_add_and_remove_are_idempotent(bridge_lab: BridgeLab) -> None:
    lab = bridge_lab
    c1, c2_6 = ("veth1", lab.c1_4), ("veth2", lab.c2_6)
    async with Firewall(gate_ns=lab.gw.path) as fw:
        assert await fw.gate_list() is None
        await rebuild(fw, [c1], lab.subnets)
        await admit(fw, [c1, c2_6])
        await admit(fw, [c1, c2_6])
        await revoke(fw, [("veth2", "10.213.1.77"), c2_6])  # one was never there
        await revoke(fw, [c2_6])
        await revoke(fw, [("veth2", lab.c1_4)])  # c1's address, but not its port
        listing = await fw.gate_list()
    assert listing is not None
    assert f'elements = {{ "veth1" . {lab.c1_4} }}' in listing
    assert lab.c2_6 not in listing and "10.213.1.77" not in listing


async def test_backends_list_the_gate_alike(bridge_lab: BridgeLab) -> None:
    lab = bridge_lab
    gw = lab.gw.path
    async with Firewall("libnftables", gate_ns=gw) as lib, Firewall("nsenter", gate_ns=gw) as cli:
        await rebuild(cli, lab.entries, lab.subnets)
        first = await lib.gate_list()
        assert first is not None
        assert first == await cli.gate_list()
        await rebuild(lib, lab.entries, lab.subnets)
        assert await cli.gate_list() == first


async def test_gate_rebuild_drops_a_leftover_shadow(
    bridge_lab: BridgeLab, tmp_path: FilePath
) -> None:
    """A replace cut short after committing its shadow (the agent killed between
    transactions) leaves `segd_gate_shadow`, a second gate that admits nothing new;
    the in-place rebuild at the next start must take it away."""
    lab = bridge_lab
    shadow = gate.render_gate_replace([], lab.subnets).txs[1]
    assert shadow.startswith("table bridge segd_gate_shadow {")
    (tmp_path / "shadow.nft").write_text(shadow)
    lab.gw.nft("-f", str(tmp_path / "shadow.nft"))
    assert not any(reach(paths(lab)).values())

    async with Firewall(gate_ns=lab.gw.path) as fw:
        await rebuild(fw, lab.entries, lab.subnets)
    assert lab.gw.nft("list", "tables").count("segd_gate") == 1
    lab.forget_neighbours()
    got = reach(paths(lab))
    assert all(got.values()), got


_RAW = r"""
import ipaddress, socket, struct, sys, time
dev, dst_mac, src, dst, port, seconds = sys.argv[1:7]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
src_mac = s.getsockname()[4]
a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
udp_len = 8 + 1
def csum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
if a.version == 4:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, a.packed, b.packed)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", 40000, int(port), udp_len, 0) + b"x"
    frame = bytes.fromhex(dst_mac.replace(":", "")) + src_mac + b"\x08\x00" + ip + udp
else:
    udp = struct.pack("!HHHH", 40000, int(port), udp_len, 0) + b"x"
    pseudo = a.packed + b.packed + struct.pack("!I3xB", udp_len, 17)
    udp = udp[:6] + struct.pack("!H", csum(pseudo + udp) or 0xFFFF) + udp[8:]
    ip = struct.pack("!IHBB16s16s", 6 << 28, udp_len, 17, 64, a.packed, b.packed)
    frame = bytes.fromhex(dst_mac.replace(":", "")) + src_mac + b"\x86\xdd" + ip + udp
end, n = time.monotonic() + float(seconds), 0
while time.monotonic() < end:
    s.send(frame)
    n += 1
print(n, flush=True)
"""
"""Raw Ethernet frames (CAP_NET_RAW, no address of its own needed) with any IP source."""


@pytest.mark.parametrize("fam", ["4", "6"])
async def test_gate_drops_a_spoofed_address_outside_every_bridge_subnet(
    fam: str, bridge_lab: BridgeLab, make_netns: MakeNetns
) -> None:
    """Spoofing: `x`, an enforced container on veth3, sends frames whose source is
    an address outside every local bridge subnet (a workload on another host):
    to a peer (forward), to the bridge address (input) and routed outside (input).
    The gate used to bind only addresses inside the bridge subnets."""
    lab = bridge_lab
    x = make_netns("x")
    own = "10.213.1.13" if fam == "4" else "fd10:213:1::13"
    attach(lab, x, "veth3", (own,))
    spoofed = "10.213.7.7" if fam == "4" else "fd10:213:7::7"
    c2, gw, far = (lab.c2_4, lab.gw4, lab.out4) if fam == "4" else (lab.c2_6, lab.gw6, lab.out6)
    bridge_mac, c2_mac = lab.gw.mac(lab.bridge), lab.c2.mac("eth0")
    lab.gw.pin_neighbour(far, lab.out.mac("dn0"), "up0")  # nothing answers for the spoofer
    counters = {
        "x->c2 (forward)": lab.c2.count_input(9001),
        "x->bridge (input)": lab.gw.count_input(9002),
        "x->outside (input, routed)": lab.out.count_input(9003),
    }
    targets = ((c2_mac, c2, 9001), (bridge_mac, gw, 9002), (bridge_mac, far, 9003))

    def flood() -> dict[str, int]:
        before = {k: count() for k, count in counters.items()}
        floods = [
            x.spawn(sys.executable, "-c", _RAW, "eth0", mac, spoofed, dst, str(port), "0.3")
            for mac, dst, port in targets
        ]
        for f in floods:
            f.wait(timeout=30)
            assert f.stdout is not None and int(f.stdout.read()) > 100
        return {k: count() - before[k] for k, count in counters.items()}

    got = flood()
    assert all(n > 0 for n in got.values()), got  # the lab forwards them without a gate

    async with Firewall(gate_ns=lab.gw.path) as fw:
        await rebuild(fw, [*lab.entries, ("veth3", own)], lab.subnets)
        got = flood()
        assert got == dict.fromkeys(counters, 0), got

        # Control: the same frames pass once (veth3, that address) is admitted.
        await admit(fw, [("veth3", spoofed)])
        got = flood()
        assert all(n > 0 for n in got.values()), got
