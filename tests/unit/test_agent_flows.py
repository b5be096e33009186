"""Logged packets -> flow records -> batches: the agent's pure flow core."""

from __future__ import annotations

import pytest

from segd.agent.flows import Directory, Flows, Key, key_of
from segd.firewall.nflog import LogPacket, Tag, parse, prefix
from segd.wire import MAX_FLOW_BATCH, Allow, Instructions, WorkloadPolicy

DB, WEB, OUT = "172.17.0.3", "172.17.0.2", "203.0.113.9"


def pkt(pfx: str, src: str, dst: str, dport: int, proto: str = "tcp", n: int = 60) -> LogPacket:
    return LogPacket(pfx, src, dst, proto, 40000, dport, n)


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        ("segd:in:a:r1", Tag("in", "allowed", "r1")),
        ("segd:out:b", Tag("out", "blocked", "")),
        ("segd:in:p", Tag("in", "potentially_blocked", "")),
        ("segd:in:a:", None),
        ("segd:up:b", None),
        ("segd:in:x", None),
        ("other:in:b", None),
        ("segd:in", None),
        ("", None),
        ("segd:in:b:r1:x", None),
    ],
)
def test_prefixes_read_back(text: str, tag: Tag | None) -> None:
    assert parse(text) == tag
    if tag is not None:
        assert prefix(*tag) == text


@pytest.mark.parametrize(
    ("packet", "key"),
    [
        (
            pkt("segd:in:b", WEB, DB, 5432),
            Key("db", "in", WEB, "tcp", 5432, "blocked", ""),
        ),
        (  # outbound: the peer is the destination, the port the server's
            pkt("segd:out:a:r1", DB, OUT, 443),
            Key("db", "out", OUT, "tcp", 443, "allowed", "r1"),
        ),
        (
            pkt("segd:in:p", WEB, DB, 53, "udp"),
            Key("db", "in", WEB, "udp", 53, "potentially_blocked", ""),
        ),
        (pkt("segd:in:b", WEB, DB, 0, "icmp"), Key("db", "in", WEB, "icmp", 0, "blocked", "")),
        (pkt("segd:in:b", WEB, DB, 7, "other"), Key("db", "in", WEB, "other", 0, "blocked", "")),
        (pkt("hostile", WEB, DB, 1), None),
    ],
)
def test_a_packet_counts_into_its_key(packet: LogPacket, key: Key | None) -> None:
    assert key_of("db", packet) == key


INSTR = Instructions(
    host_id="h",
    version=1,
    workloads=[
        WorkloadPolicy("w-db", "db", {}, [DB], [Allow("r1", None, [])], []),
        WorkloadPolicy("w-web", "web", {}, [WEB], [], []),
    ],
    sets={},
    rules=[],
)


def test_an_interval_aggregates_per_key_and_resolves_workloads() -> None:
    f = Flows()
    f.count("db", [pkt("segd:in:b", WEB, DB, 5432, n=60)] * 3, now=10.0)
    f.count("db", [pkt("segd:in:b", WEB, DB, 5432, n=40)], now=12.5)
    f.count("db", [pkt("segd:out:a:r1", DB, OUT, 443)], now=11.0)
    f.count("db", [pkt("forged", WEB, DB, 1)], now=11.0)
    assert f.close_interval(Directory.of(INSTR)) == 2
    batch = f.next_batch()
    assert batch is not None and batch.lost == 0
    blocked, out = sorted(batch.records, key=lambda r: r.direction)
    assert (blocked.workload_id, blocked.peer_workload_id, blocked.verdict) == (
        "w-db",
        "w-web",
        "blocked",
    )
    assert (blocked.connections, blocked.packets, blocked.bytes) == (4, 4, 220)
    assert (blocked.first_seen, blocked.last_seen) == (10.0, 12.5)
    assert (out.peer_workload_id, out.rule_id, out.port) == ("", "r1", 443)  # external
    assert f.ignored == 1
    f.sent(batch)
    assert f.next_batch() is None and f.queued == 0


def test_an_unpaired_container_has_no_workload() -> None:
    f = Flows()
    f.count("intruder", [pkt("segd:out:b", "172.17.0.9", DB, 5432)], now=1.0)
    f.close_interval(Directory.of(INSTR))
    batch = f.next_batch()
    assert batch is not None
    (r,) = batch.records
    assert (r.container_id, r.workload_id, r.peer_workload_id) == ("intruder", "", "w-db")


def test_records_beyond_the_interval_bound_are_dropped_and_counted() -> None:
    f = Flows(max_keys=10)
    f.count("db", [pkt("segd:in:b", f"10.0.0.{i}", DB, 80) for i in range(25)], now=1.0)
    f.count("db", [pkt("segd:in:b", "10.0.0.1", DB, 80)], now=2.0)  # an existing key still counts
    assert f.close_interval(Directory({}, {})) == 10
    batch = f.next_batch()
    assert batch is not None and batch.lost == 15 and len(batch.records) == 10
    f.sent(batch)
    assert f.lost == 0 and f.lost_total == 15


def test_a_full_queue_drops_its_oldest_batches_and_counts_their_records() -> None:
    f = Flows(max_queued=MAX_FLOW_BATCH + 10)
    for interval in range(3):
        f.count("db", [pkt("segd:in:b", f"10.0.{interval}.{i}", DB, 80) for i in range(20)], 1.0)
        f.close_interval(Directory({}, {}))
    assert f.queued == 60 and len(f.queue) == 3  # under the bound: all kept
    f.count(
        "db",
        [pkt("segd:in:b", f"10.{i // 250}.0.{i % 250}", DB, 80) for i in range(MAX_FLOW_BATCH)],
        1.0,
    )
    f.close_interval(Directory({}, {}))
    assert f.queued == MAX_FLOW_BATCH and f.lost == 60
    batch = f.next_batch()
    assert batch is not None and len(batch.records) == MAX_FLOW_BATCH and batch.lost == 60


def test_a_large_interval_is_cut_into_batches_the_server_takes() -> None:
    f = Flows()
    f.count(
        "db", [pkt("segd:in:b", f"10.{i // 250}.0.{i % 250}", DB, 80) for i in range(12_000)], 1.0
    )
    f.close_interval(Directory({}, {}))
    sizes = []
    while (batch := f.next_batch()) is not None:
        sizes.append(len(batch.records))
        f.sent(batch)
    assert sizes == [MAX_FLOW_BATCH, MAX_FLOW_BATCH, 2000]


def test_a_batch_not_sent_stays_queued_and_overruns_are_lost() -> None:
    f = Flows()
    f.overrun(2)
    f.count("db", [pkt("segd:in:b", WEB, DB, 80)], 1.0)
    f.close_interval(Directory({}, {}))
    first = f.next_batch()
    assert first is not None and first.lost == 2
    assert f.next_batch() == first  # the server did not take it: the same again
    f.overrun(1)  # meanwhile
    f.sent(first)
    rest = f.next_batch()
    assert rest is not None and rest.records == [] and rest.lost == 1
