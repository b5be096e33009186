"""Connections of a workload at level `enhanced` are counted by conntrack in its
namespace: final packets and bytes when one ends, running ones in a dump
(real packets)."""

from __future__ import annotations

import asyncio
import os
import sys

import msgspec
import pytest

from segd.firewall import render
from segd.firewall.kernel import CtEntry, Firewall, NsRef
from segd.policy import Service
from segd.wire import Allow, VisibilityLevel, WorkloadPolicy
from tests.kernel.conftest import Netns, Pair, Probe

pytestmark = pytest.mark.kernel

PEERS = "ls_00000000000000aa"
PORT = 5432
CHUNK = 10_000
POLICY = WorkloadPolicy(
    "w",
    "c",
    {},
    [],
    inbound=[Allow("db", PEERS, [Service("tcp", PORT, PORT)])],
    outbound=[],
    visibility="enhanced",
)

_SINK = r"""
import socket, sys, threading
CHUNK = int(sys.argv[2])
def take(c):
    with c:
        while True:
            got = 0
            while got < CHUNK:
                data = c.recv(CHUNK - got)
                if not data:
                    return
                got += len(data)
            c.sendall(b"k")
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[1])))
s.listen(16)
print("ready", flush=True)
while True:
    threading.Thread(target=take, args=(s.accept()[0],), daemon=True).start()
"""

_SENDER = r"""
import socket, sys
host, port, chunk, src = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.create_connection((host, port), timeout=5, source_address=(src, 0))
print(s.getsockname()[1], flush=True)
for line in sys.stdin:
    for _ in range(int(line)):
        s.sendall(b"x" * chunk)
        assert s.recv(1) == b"k"
    print("sent", flush=True)
s.shutdown(socket.SHUT_WR)
assert s.recv(1) == b""
s.close()
print("closed", flush=True)
"""


class Sender:
    """One TCP connection from a namespace to the sink, sending chunks when told."""

    def __init__(self, ns: Netns, host: str, src: str) -> None:
        argv = (_SENDER, host, str(PORT), str(CHUNK), src)
        self.proc = ns.spawn(sys.executable, "-c", *argv, stdin=True)
        self.sport = int(self._line())

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def send(self, chunks: int) -> None:
        """Send `chunks` chunks, each acknowledged by the sink once it has read it."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{chunks}\n")
        self.proc.stdin.flush()
        assert self._line() == "sent"

    def close(self) -> None:
        """Close the connection both ways (FIN, FIN)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self._line() == "closed"


def sink(ns: Netns) -> None:
    proc = ns.spawn(sys.executable, "-c", _SINK, str(PORT), str(CHUNK))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"


class Counted:
    """What the firewall's count callback was given, per namespace."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, CtEntry]] = []
        self.lost = 0

    def __call__(self, key: str, entries: list[CtEntry], lost: int) -> None:
        self.entries += [(key, e) for e in entries]
        self.lost += lost


def level(lvl: VisibilityLevel) -> WorkloadPolicy:
    return msgspec.structs.replace(POLICY, visibility=lvl)


def short_tcp_timeouts(ns: Netns) -> None:
    """A closed TCP connection stays tracked for seconds (TIME_WAIT: 120 by
    default); its destroy event, with the final counters, comes only then."""
    for state in ("time_wait", "close"):
        ns.sysctl(f"net.netfilter.nf_conntrack_tcp_timeout_{state}", "1")


async def until_ended(fw: Firewall, counted: Counted, within: float = 4.0) -> None:
    """Dump every 0.1 s until a destroy event came: a dump reaps entries that
    timed out (the kernel's own reaping can take a minute)."""
    for _ in range(int(within / 0.1)):
        if counted.entries:
            return
        await fw.conntrack_dump()
        await asyncio.sleep(0.1)


async def test_a_finished_transfer_is_counted_with_its_final_bytes(pair: Pair) -> None:
    short_tcp_timeouts(pair.b)
    sink(pair.b)
    counted = Counted()
    async with Firewall(on_count=counted) as fw:
        ns = NsRef("b", pair.b.path)
        await fw.apply(ns, render.render_workload(POLICY, {PEERS: [pair.a4]}))
        assert fw.counters == 1
        sender = Sender(pair.a, pair.b4, pair.a4)
        sender.send(20)
        sender.close()
        await until_ended(fw, counted)
    [(key, e)] = counted.entries
    assert key == "b"
    assert (e.proto, e.src, e.dst, e.sport, e.dport) == (
        "tcp",
        pair.a4,
        pair.b4,
        sender.sport,
        PORT,
    )
    assert e.ended
    assert e.bytes >= 20 * CHUNK
    assert e.packets >= 2 * 20  # at least each chunk and its acknowledgement


async def test_a_long_lived_connection_shows_in_dumps_with_growing_counters(pair: Pair) -> None:
    sink(pair.b)
    counted = Counted()
    async with Firewall(on_count=counted) as fw:
        ns = NsRef("b", pair.b.path)
        await fw.apply(ns, render.render_workload(POLICY, {PEERS: [pair.a6]}))
        sender = Sender(pair.a, pair.b6, pair.a6)
        sender.send(1)
        first = await fw.conntrack_dump()
        sender.send(3)
        later = await fw.conntrack_dump()
    [before] = [e for e in first["b"] if e.sport == sender.sport]
    [after] = [e for e in later["b"] if e.sport == sender.sport]
    assert (before.proto, before.src, before.dst, before.dport) == ("tcp", pair.a6, pair.b6, PORT)
    assert before.id == after.id
    assert not before.ended and not after.ended
    assert CHUNK <= before.bytes < after.bytes and after.bytes >= 4 * CHUNK
    assert before.packets < after.packets
    assert counted.entries == []  # nothing ended


async def test_a_denied_connection_makes_no_entry(pair: Pair) -> None:
    pair.b.serve(tcp=[PORT, PORT + 1])
    counted = Counted()
    async with Firewall(on_count=counted) as fw:
        ns = NsRef("b", pair.b.path)
        await fw.apply(ns, render.render_workload(POLICY, {PEERS: [pair.a4]}))
        probes = [
            Probe(pair.b4, PORT, src=pair.a4),
            Probe(pair.b4, PORT + 1, src=pair.a4),  # no rule for the port
            Probe(pair.b4, PORT, src=pair.a4_other),  # not a peer
        ]
        assert pair.a.probe(probes) == ["ok", "timeout", "timeout"]
        dumped = await fw.conntrack_dump()
    tuples = {(e.src, e.dport) for e in dumped["b"]}
    assert tuples == {(pair.a4, PORT)}
    assert counted.entries == []


async def test_a_plan_that_does_not_count_closes_the_counter(pair: Pair) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    async with Firewall(on_count=Counted()) as fw:
        ns = NsRef("b", pair.b.path)
        sets = {PEERS: [pair.a4]}
        await fw.apply(ns, render.render_workload(POLICY, sets))
        assert fw.counters == 1
        delta = render.render_set_delta(sets, {PEERS: [pair.a4_other]}, {PEERS})
        assert delta is not None
        await fw.apply(ns, delta)
        assert fw.counters == 1  # a set delta says nothing about counting
        await fw.apply(ns, render.render_workload(level("blocked+allowed"), sets, was=[PEERS]))
        assert fw.counters == 0
        await fw.apply(ns, render.render_workload(POLICY, sets, was=[PEERS]))
        assert fw.counters == 1
        await fw.apply(ns, render.render_isolation(was=[PEERS]))
        assert fw.counters == 0
        await fw.apply(ns, render.render_workload(POLICY, sets, was=[]))
        await fw.apply(ns, render.render_removal())
        assert fw.counters == 0
    assert len(os.listdir("/proc/self/fd")) == fds


async def test_forget_closes_the_counter_and_a_new_namespace_gets_a_new_one(pair: Pair) -> None:
    async with Firewall(on_count=Counted()) as fw:
        ns = NsRef("b", pair.b.path)
        await fw.apply(ns, render.render_workload(POLICY, {}))
        assert fw.counters == 1
        await fw.forget(ns)
        assert fw.counters == 0
        await fw.apply(ns, render.render_workload(POLICY, {}))
        assert fw.counters == 1
        pair.b.recreate()  # the container restarted: same key, new namespace
        await fw.apply(ns, render.render_workload(POLICY, {}))
        assert fw.counters == 1
        pair.b.ip("link", "set", "lo", "up")
        pair.b.serve(tcp=[PORT])
        assert pair.b.probe([Probe("::1", PORT)]) == ["ok"]
        dumped = await fw.conntrack_dump()
    assert [(e.src, e.dst, e.dport) for e in dumped["b"]] == [("::1", "::1", PORT)]
    assert fw.counters == 0  # closed with the firewall


async def test_without_a_callback_nothing_is_counted(pair: Pair) -> None:
    async with Firewall() as fw:
        await fw.apply(NsRef("b", pair.b.path), render.render_workload(POLICY, {}))
        assert fw.counters == 0
        assert await fw.conntrack_dump() == {}


async def test_a_namespace_ending_more_connections_than_the_budget_is_read_within_it(
    pair: Pair,
) -> None:
    """120 connections end at once; with a budget of 5 a second the firewall
    reads them a second's worth at a time (the loop is never taken over), and
    every one is still counted (the kernel's queue held them)."""
    short_tcp_timeouts(pair.b)
    pair.b.serve(tcp=[PORT])
    counted = Counted()
    async with Firewall(on_count=counted, log_budget=5) as fw:
        ns = NsRef("b", pair.b.path)
        await fw.apply(ns, render.render_workload(POLICY, {PEERS: [pair.a4]}))
        assert pair.a.probe([Probe(pair.b4, PORT, src=pair.a4)] * 120) == ["ok"] * 120
        await asyncio.sleep(1.5)  # past TIME_WAIT and CLOSE (1 s here)
        await fw.conntrack_dump()  # reaps them: their destroy events come now
        await asyncio.sleep(0.5)
        first = len(counted.entries)
        for _ in range(100):
            if len(counted.entries) + counted.lost >= 120:
                break
            await fw.conntrack_dump()
            await asyncio.sleep(0.1)
    # within half a second: the budget and one read's worth (16 datagrams)
    assert 0 < first <= 5 + 16, first
    assert len(counted.entries) + counted.lost >= 120
