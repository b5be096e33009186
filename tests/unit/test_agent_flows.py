"""Logged packets -> flow records -> batches: the agent's pure flow core."""

from __future__ import annotations

import pytest

from segd.agent.flows import Directory, Flows, Key, key_of
from segd.firewall.conntrack import CtEntry
from segd.firewall.nflog import LogPacket, Tag, parse, prefix
from segd.wire import (
    MAX_FLOW_BATCH,
    Allow,
    Instructions,
    Mode,
    VisibilityLevel,
    WorkloadPolicy,
)

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
    assert f.next_batch() is first  # offered again as it was, under its name
    f.sent(first)
    rest = f.next_batch()
    assert rest is not None and rest.records == [] and rest.lost == 1
    assert rest.batch_id and rest.batch_id != first.batch_id


def test_a_clock_stepped_back_never_makes_last_seen_before_first_seen() -> None:
    """The server refuses a whole batch for one record whose last_seen is before
    its first_seen."""
    f = Flows()
    f.count("db", [pkt("segd:in:b", WEB, DB, 80)], now=100.0)
    f.count("db", [pkt("segd:in:b", WEB, DB, 80)], now=40.0)  # NTP stepped back a minute
    f.close_interval(Directory({}, {}))
    batch = f.next_batch()
    assert batch is not None
    (r,) = batch.records
    assert (r.first_seen, r.last_seen, r.connections) == (100.0, 100.0, 2)


def test_a_batch_keeps_its_name_until_its_answer_is_heard() -> None:
    names = iter(["n1", "n2", "n3"])
    f = Flows(names=lambda: next(names))
    for interval in range(2):
        f.count("db", [pkt("segd:in:b", f"10.0.{interval}.1", DB, 80)], 1.0)
        f.close_interval(Directory({}, {}))
    first = f.next_batch()
    assert first is not None and first.batch_id == "n1"
    assert f.next_batch() is first  # no answer heard (a timeout): the same batch
    f.sent(first)
    second = f.next_batch()
    assert second is not None and second.batch_id == "n2"
    f.refused(second)  # its record is lost, and said so in a batch of its own
    third = f.next_batch()
    assert third is not None and (third.records, third.lost, third.batch_id) == ([], 1, "n3")


def test_a_full_queue_keeps_the_batch_out_to_the_server() -> None:
    """The server may keep the batch whose answer is not heard yet: the next
    oldest is dropped instead, so no record is both kept and counted lost."""
    f = Flows(max_queued=30)
    f.count("db", [pkt("segd:in:b", f"10.0.0.{i}", DB, 80) for i in range(20)], 1.0)
    f.close_interval(Directory({}, {}))
    out = f.next_batch()
    assert out is not None
    f.count("db", [pkt("segd:in:b", f"10.0.1.{i}", DB, 80) for i in range(10)], 1.0)
    f.close_interval(Directory({}, {}))
    assert f.queued == 30 and f.lost == 0  # at the bound
    f.count("db", [pkt("segd:in:b", f"10.0.2.{i}", DB, 80) for i in range(10)], 1.0)
    f.close_interval(Directory({}, {}))
    assert f.queue[0] is out.records and f.lost == 10  # the interval after it went
    assert f.queued == 30 and f.next_batch() is out


# ---- `enhanced`: connections counted whole from conntrack -------------------------------


def ct(
    i: int,
    packets: int,
    size: int,
    *,
    ended: bool,
    src: str = WEB,
    dst: str = DB,
    dport: int = 5432,
) -> CtEntry:
    return CtEntry(i, "tcp", src, dst, 40000, dport, packets, size, ended)


def counted_db() -> Flows:
    f = Flows()
    f.recount({"db": frozenset({DB})})
    return f


def records(f: Flows) -> dict[Key, tuple[int, int, int]]:
    """(connections, packets, bytes) of each record of the interval."""
    return {k: (t.connections, t.packets, t.bytes) for k, t in f.current.items()}


def test_a_logged_connection_gets_its_bytes_from_conntrack_under_its_rule() -> None:
    f = counted_db()
    f.count("db", [pkt("segd:in:a:r1", WEB, DB, 5432)], 1.0)
    f.count_connections("db", [ct(7, 12, 9_000, ended=True)], 2.0)
    key = Key("db", "in", WEB, "tcp", 5432, "allowed", "r1")
    # the logged first packet counts the connection, conntrack every packet of it
    assert records(f) == {key: (1, 12, 9_000)}


def test_a_connection_no_log_opened_is_allowed_with_no_rule_its_side_from_the_address() -> None:
    f = counted_db()
    f.count_connections("db", [ct(1, 4, 500, ended=True, src=DB, dst=OUT, dport=443)], 1.0)
    f.count_connections("db", [ct(2, 6, 700, ended=True)], 1.0)
    assert records(f) == {
        Key("db", "out", OUT, "tcp", 443, "allowed", ""): (1, 4, 500),
        Key("db", "in", WEB, "tcp", 5432, "allowed", ""): (1, 6, 700),
    }


def test_an_open_connection_counts_what_it_carried_each_interval_and_once_in_all() -> None:
    f = counted_db()
    f.count("db", [pkt("segd:in:a:r1", WEB, DB, 5432)], 1.0)
    key = Key("db", "in", WEB, "tcp", 5432, "allowed", "r1")
    f.count_connections("db", [ct(3, 10, 1_000, ended=False)], 2.0, dump=True)
    assert records(f) == {key: (1, 10, 1_000)}
    f.close_interval(Directory({}, {}))
    f.count_connections("db", [ct(3, 25, 4_000, ended=False)], 3.0, dump=True)
    assert records(f) == {key: (0, 15, 3_000)}  # what grew; the connection counted before
    f.close_interval(Directory({}, {}))
    f.count_connections("db", [ct(3, 30, 5_500, ended=True)], 4.0)
    assert records(f) == {key: (0, 5, 1_500)}
    assert f.running == {"db": {}} and f.opened == {"db": {}}


def test_a_dump_forgets_connections_that_ended_unseen() -> None:
    f = counted_db()
    f.count("db", [pkt("segd:in:a:r1", WEB, DB, 5432)], 1.0)
    f.count_connections("db", [ct(3, 10, 1_000, ended=False)], 2.0, dump=True)
    f.count_connections("db", [], 3.0, dump=True)  # its DESTROY event was lost
    assert f.running == {"db": {}} and f.opened == {"db": {}}


def test_blocked_packets_still_count_from_the_log_and_uncounted_containers_ignore_conntrack() -> (
    None
):
    f = counted_db()
    f.count("db", [pkt("segd:in:b", WEB, DB, 22, n=60)] * 2, 1.0)
    f.count_connections("web", [ct(1, 5, 500, ended=True)], 1.0)  # web is not counted
    f.count("web", [pkt("segd:out:a:r1", WEB, DB, 5432, n=60)], 1.0)
    assert records(f) == {
        Key("db", "in", WEB, "tcp", 22, "blocked", ""): (2, 2, 120),
        Key("web", "out", DB, "tcp", 5432, "allowed", "r1"): (1, 1, 60),
    }


def test_a_container_no_longer_counted_is_forgotten() -> None:
    f = counted_db()
    f.count("db", [pkt("segd:in:a:r1", WEB, DB, 5432)], 1.0)
    f.count_connections("db", [ct(3, 10, 1_000, ended=False)], 2.0, dump=True)
    f.recount({})
    assert f.running == {} and f.opened == {}
    f.count_connections("db", [ct(3, 30, 5_500, ended=True)], 4.0)
    assert sum(t.packets for t in f.current.values()) == 10  # nothing more counted


def test_past_max_conns_an_open_connection_is_counted_once_when_it_ends() -> None:
    f = counted_db()
    f.max_conns = 1
    f.count_connections("db", [ct(1, 5, 50, ended=False), ct(2, 7, 70, ended=False)], 1.0)
    assert f.running == {"db": {1: (5, 50)}}
    f.count_connections("db", [ct(2, 9, 90, ended=True)], 2.0)
    key = Key("db", "in", WEB, "tcp", 5432, "allowed", "")
    # 1 counted while open (5, 50); 2 counted whole when it ended (9, 90)
    assert records(f) == {key: (2, 14, 140)}


def test_past_max_conns_a_logged_connection_is_counted_once_by_its_log() -> None:
    f = counted_db()
    f.max_conns = 1
    f.count("db", [pkt("segd:in:a:r1", WEB, DB, 5432)], 1.0)  # remembered
    late = LogPacket("segd:in:p", WEB, DB, "tcp", 40001, 5432, 60)
    f.count("db", [late], 1.0)  # past the bound: not remembered
    f.count_connections("db", [CtEntry(2, "tcp", WEB, DB, 40001, 5432, 9, 900, True)], 2.0)
    logged = Key("db", "in", WEB, "tcp", 5432, "potentially_blocked", "")
    unlogged = Key("db", "in", WEB, "tcp", 5432, "allowed", "")
    assert records(f)[logged] == (1, 0, 0)  # its verdict, counted once
    assert records(f)[unlogged] == (0, 9, 900)  # its packets and bytes, no second count
    assert sum(c for c, _, _ in records(f).values()) == 2


def test_a_connection_that_ends_while_the_dump_runs_is_counted_once() -> None:
    f = counted_db()
    f.count("db", [pkt("segd:in:a:r1", WEB, DB, 5432)], 1.0)
    f.dump_started()
    snapshot = {"db": [ct(7, 10, 1_000, ended=False)]}  # taken before it ended
    f.count_connections("db", [ct(7, 12, 1_200, ended=True)], 2.0)  # meanwhile
    f.count_open(snapshot, 3.0)
    key = Key("db", "in", WEB, "tcp", 5432, "allowed", "r1")
    assert records(f) == {key: (1, 12, 1_200)}
    assert not f.dumping and f.running == {"db": {}} and f.opened == {"db": {}}


def test_a_connection_first_logged_while_the_dump_runs_keeps_its_record() -> None:
    f = counted_db()
    f.dump_started()
    f.count("db", [LogPacket("segd:in:p", WEB, DB, "tcp", 40001, 5432, 60)], 1.0)  # meanwhile
    f.count_open({"db": []}, 2.0)  # the snapshot was taken before it opened
    f.count_connections("db", [CtEntry(8, "tcp", WEB, DB, 40001, 5432, 5, 500, True)], 3.0)
    key = Key("db", "in", WEB, "tcp", 5432, "potentially_blocked", "")
    assert records(f) == {key: (1, 5, 500)}


def test_the_directory_counts_enhanced_workloads_with_a_table() -> None:
    def w(cid: str, visibility: VisibilityLevel, mode: Mode = "full") -> WorkloadPolicy:
        return WorkloadPolicy(
            "w" + cid, cid, {}, [cid + ".1"], [], [], mode=mode, visibility=visibility
        )

    instr = Instructions(
        "h", 1, [w("a", "enhanced"), w("b", "blocked+allowed"), w("c", "enhanced", "idle")], {}, []
    )
    assert Directory.of(instr).counted == {"a": frozenset({"a.1"})}
