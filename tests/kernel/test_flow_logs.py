"""What a container's table logs reaches segd's NFLOG reader, in the container's
namespace, with kernel logging of other namespaces off (real packets)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import msgspec
import pytest

from segd.firewall import gate, nflog, render
from segd.firewall.kernel import Firewall, LogPacket, NsRef
from segd.policy import Service
from segd.wire import Allow, Mode, VisibilityLevel, WorkloadPolicy
from tests.kernel.conftest import BridgeLab, Pair, Probe

pytestmark = pytest.mark.kernel

PEERS = "ls_00000000000000aa"
POLICY = WorkloadPolicy(
    "w",
    "c",
    {},
    [],
    inbound=[Allow("db", PEERS, [Service("tcp", 5432, 5432)])],
    outbound=[],
)


class Seen:
    """What the firewall's log callback was given, per namespace."""

    def __init__(self) -> None:
        self.packets: list[tuple[str, LogPacket]] = []
        self.lost = 0

    def __call__(self, key: str, packets: list[LogPacket], lost: int) -> None:
        self.packets += [(key, p) for p in packets]
        self.lost += lost

    def tags(self) -> set[tuple[str, str, str, int]]:
        return {(k, p.prefix, p.src, p.dport) for k, p in self.packets}


async def settle(until: Callable[[], bool], within: float = 3.0) -> None:
    """Let the loop read what the kernel queued (NFLOG flushes every 0.1 s)."""
    for _ in range(int(within / 0.05)):
        if until():
            return
        await asyncio.sleep(0.05)


def with_mode(
    mode: Mode, level: VisibilityLevel, policy: WorkloadPolicy = POLICY
) -> WorkloadPolicy:
    return msgspec.structs.replace(policy, mode=mode, visibility=level)


def kernel_log_of_other_namespaces() -> str:
    with open("/proc/sys/net/netfilter/nf_log_all_netns") as f:
        return f.read().strip()


async def test_log_rule_option_reaches_the_reader_in_a_container_namespace(pair: Pair) -> None:
    """The rule option `log` rendered kernel-log `log prefix`, which prints nothing
    in a container namespace: it now logs to NFLOG, read inside the namespace."""
    if kernel_log_of_other_namespaces() != "0":
        pytest.skip("net.netfilter.nf_log_all_netns is 1 on this host")
    pair.b.serve(tcp=[5432])
    seen = Seen()
    async with Firewall(on_log=seen) as fw:
        ns = NsRef("b", pair.b.path)
        await fw.apply(ns, render.render_workload(POLICY, {PEERS: [pair.a4]}, frozenset({"db"})))
        assert fw.log_readers == 1
        assert pair.a.probe([Probe(pair.b4, 5432, src=pair.a4)] * 3) == ["ok"] * 3
        await settle(lambda: len(seen.packets) >= 3)
    assert seen.tags() == {("b", "segd:in:a:db", pair.a4, 5432)}
    assert len(seen.packets) == 3  # the first packet of each connection, once


async def test_drops_are_logged_as_blocked_and_accepts_with_their_rule(pair: Pair) -> None:
    pair.b.serve(tcp=[5432, 5433])
    seen = Seen()
    async with Firewall(on_log=seen) as fw:
        ns = NsRef("b", pair.b.path)
        policy = with_mode("full", "blocked+allowed")
        await fw.apply(ns, render.render_workload(policy, {PEERS: [pair.a4]}))
        probes = [Probe(pair.b4, 5432, src=pair.a4), Probe(pair.b4, 5433, src=pair.a4)]
        assert pair.a.probe(probes) == ["ok", "timeout"]
        await settle(lambda: {p.prefix for _, p in seen.packets} >= {"segd:in:b"})
    tags = seen.tags()
    assert ("b", "segd:in:a:db", pair.a4, 5432) in tags
    assert ("b", "segd:in:b", pair.a4, 5433) in tags
    assert not [p for _, p in seen.packets if p.dport == 5433 and p.prefix != "segd:in:b"]


async def test_visibility_mode_lets_what_it_would_drop_through_and_full_blocks_it_again(
    pair: Pair,
) -> None:
    pair.b.serve(tcp=[5433])
    seen = Seen()
    async with Firewall(on_log=seen) as fw:
        ns = NsRef("b", pair.b.path)
        await fw.apply(ns, render.render_workload(with_mode("visibility", "blocked"), {}))
        assert pair.a.probe([Probe(pair.b4, 5433, src=pair.a4)]) == ["ok"]
        await settle(lambda: bool(seen.packets))
        assert ("b", "segd:in:p", pair.a4, 5433) in seen.tags()
        # back to full: the same table rewritten in place, the probe blocked again
        await fw.apply(ns, render.render_workload(with_mode("full", "blocked"), {}, was=[]))
        assert pair.a.probe([Probe(pair.b4, 5433, src=pair.a4)]) == ["timeout"]
        await settle(lambda: ("b", "segd:in:b", pair.a4, 5433) in seen.tags())
    assert ("b", "segd:in:b", pair.a4, 5433) in seen.tags()


async def test_a_drop_flood_reaches_the_reader_rate_limited(pair: Pair) -> None:
    seen = Seen()
    async with Firewall(on_log=seen) as fw:
        ns = NsRef("b", pair.b.path)
        await fw.apply(ns, render.render_workload(with_mode("full", "blocked"), {}))
        flood = pair.a.flood_udp(pair.b4, 9999, seconds=1.0)
        out, _ = flood.communicate(timeout=30)
        sent = int(out.split()[-1])
        await settle(lambda: False, within=0.5)
    logged = [p for _, p in seen.packets if p.dport == 9999]
    assert {p.prefix for p in logged} == {"segd:in:b"}
    # at most the burst plus the rate over the flood's second (and the reads after it)
    assert sent > 10 * nflog.DROP_RATE and len(logged) <= nflog.DROP_BURST + 3 * nflog.DROP_RATE
    assert seen.lost == 0


async def test_forget_closes_the_reader(pair: Pair) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    async with Firewall(on_log=Seen()) as fw:
        ns = NsRef("b", pair.b.path)
        await fw.apply(ns, render.render_workload(with_mode("full", "blocked"), {}))
        await fw.apply(ns, render.render_workload(with_mode("full", "off"), {}, was=[]))
        assert fw.log_readers == 1  # one per namespace, whatever the table says
        await fw.forget(ns)
        assert fw.log_readers == 0
        await fw.apply(ns, render.render_removal())
        assert fw.log_readers == 0  # no table, nothing to read
        await fw.apply(ns, render.render_isolation(was=[]))
        assert fw.log_readers == 1
    assert fw.log_readers == 0  # closed with the firewall
    assert len(os.listdir("/proc/self/fd")) == fds


async def test_an_isolated_namespace_reports_what_it_sends_as_blocked(pair: Pair) -> None:
    """An unpaired container's attempts are reported from its own namespace."""
    pair.a.serve(tcp=[5432])
    seen = Seen()
    async with Firewall(on_log=seen) as fw:
        await fw.apply(NsRef("b", pair.b.path), render.render_isolation())
        assert pair.b.probe([Probe(pair.a4, 5432)]) == ["timeout"]
        await settle(lambda: bool(seen.packets))
    assert ("b", "segd:out:b", pair.b4, 5432) in seen.tags()
    tcp = [p for _, p in seen.packets if p.dport == 5432]
    assert {(p.dst, p.proto) for p in tcp} == {(pair.a4, "tcp")}


async def test_the_gate_logs_what_it_drops_in_its_namespace(bridge_lab: BridgeLab) -> None:
    """c1 is not admitted: what it sends to c2 and what the host sends it are
    dropped by the gate and reach the reader in the gate's namespace, as c1 sees
    them (out / in), both families."""
    lab = bridge_lab
    lab.c2.serve(tcp=[80])
    lab.c1.serve(tcp=[81])
    seen = Seen()
    async with Firewall(gate_ns=lab.gw.path, on_log=seen) as fw:
        admitted = [(lab.c2_port, lab.c2_4), (lab.c2_port, lab.c2_6)]
        await fw.gate_apply(gate.render_gate(admitted, lab.subnets))
        assert fw.log_readers == 1
        assert lab.c1.probe([Probe(lab.c2_4, 80), Probe(lab.c2_6, 80)]) == ["timeout"] * 2
        assert lab.gw.probe([Probe(lab.c1_4, 81)]) == ["timeout"]
        want = {
            (nflog.GATE_LOG_KEY, "segd:out:b", lab.c1_4, 80),
            (nflog.GATE_LOG_KEY, "segd:in:b", lab.gw4, 81),
        }

        def v6() -> bool:  # neighbour discovery or the SYN: whichever c1 got to send
            return any(p.prefix == "segd:out:b" and p.src == lab.c1_6 for _, p in seen.packets)

        await settle(lambda: want <= seen.tags() and v6())
    assert want <= seen.tags(), seen.tags()
    assert v6(), seen.tags()
    # every drop is c1's (the one not admitted), attributed to it by its address
    c1 = {lab.c1_4, lab.c1_6}
    for _, p in seen.packets:
        assert (p.src if p.prefix == "segd:out:b" else p.dst) in c1, p


async def test_a_namespace_that_logs_more_than_segd_does_is_read_within_a_budget(
    pair: Pair,
) -> None:
    """A process in the container adds its own rule logging every packet to
    segd's group and floods: the agent reads at most its budget a second from
    that namespace (the kernel drops the rest), so its loop is not taken over."""
    budget = 500
    seen = Seen()
    async with Firewall(on_log=seen, log_budget=budget) as fw:
        ns = NsRef("b", pair.b.path)
        await fw.apply(ns, render.render_workload(with_mode("visibility", "off"), {}))
        pair.b.nft(
            "add table inet hostile; add chain inet hostile o { type filter hook output"
            f' priority 0; }}; add rule inet hostile o log group {nflog.GROUP} prefix "x"'
        )
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        flood = pair.b.flood_udp(pair.a4, 9999, seconds=2.0)
        out, _ = await asyncio.to_thread(flood.communicate, timeout=30)
        await asyncio.sleep(1.0)
        elapsed = loop.time() - t0
    sent = int(out.split()[-1])
    read = len(seen.packets)
    assert sent > 5 * budget * elapsed  # the flood logged far more than the budget
    # per second begun: at most the budget and one read's worth (16 datagrams of 64)
    assert 0 < read <= (budget + 16 * 64) * (int(elapsed) + 1), (read, sent, elapsed)
    assert read < sent / 5
