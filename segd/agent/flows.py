"""Flow records from logged packets (pure).

Each packet a container's table logged (`segd.firewall.nflog`) is counted into
one record keyed by (container, direction, peer address, protocol, server
port, verdict, rule id) for the current interval; `take` closes the interval
and returns its records, peer addresses resolved to workloads through the
instructions (`Directory`), else left external. The server's port is the
destination port of the packet (what a table logs is the first packet of a
connection, or a dropped packet: both go to the server); icmp has port 0.

At visibility level `enhanced` a container's connections are also counted
whole, from its namespace's conntrack (`segd.firewall.conntrack`): the bytes
and packets of both directions, from the entry's end (a DESTROY event) or,
for a connection still open, from a dump each interval (what grew since the
last one). A connection's counts go to the record its first packet opened
when the table logged it (so to its rule), else to an `allowed` record with no
rule id (it was open before the table logged, or its log was rate-limited);
at that level the logged first packet counts the connection only, so nothing
is counted twice.

A dump runs while the loop goes on counting (`dump_started`, then
`count_open` with what it found): a connection that ended meanwhile was
counted when it ended, and one first logged meanwhile keeps its record,
whatever the dump (taken before) says of them.

Memory is bounded: at most `max_keys` records per interval (a packet
that would open another is dropped and counted), at most `max_queued`
records waiting to be sent (the oldest batches go first, counted), and at
most `max_conns` connections remembered per container (beyond that, a
logged connection is counted by its log, and its packets and bytes go to an
`allowed` record with no rule id). What was dropped, and the reader's overruns, are
reported as `FlowBatchIn.lost`.

A batch, once offered (`next_batch`), is offered again unchanged, under the
same name (`FlowBatchIn.batch_id`), until the server's answer is heard
(`sent`, `refused`): a batch the server kept but whose answer was lost is not
kept twice.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from segd.firewall import nflog
from segd.firewall.conntrack import CtEntry
from segd.firewall.nflog import LogPacket
from segd.wire import (
    MAX_FLOW_BATCH,
    Direction,
    FlowBatchIn,
    FlowProto,
    FlowRecordIn,
    Instructions,
    Verdict,
)

INTERVAL_MIN_S = 15.0
INTERVAL_MAX_S = 60.0

_PROTOS: dict[str, FlowProto] = {"tcp": "tcp", "udp": "udp", "icmp": "icmp"}


class Key(NamedTuple):
    container_id: str
    direction: Direction
    peer_ip: str
    proto: FlowProto
    port: int
    verdict: Verdict
    rule_id: str


class Conn(NamedTuple):
    """A connection of a container, as its first packet (and conntrack's
    original direction) has it."""

    proto: FlowProto
    src: str
    sport: int
    dst: str
    dport: int


def _conn(e: CtEntry) -> Conn:
    return Conn(_PROTOS.get(e.proto, "other"), e.src, e.sport, e.dst, e.dport)


def _unlogged(container: str, c: Conn, ips: frozenset[str]) -> Key:
    """The record of a counted connection no log opened: `allowed`, no rule id;
    the container opened it when its source is one of the container's addresses."""
    out = c.src in ips
    port = c.dport if c.proto in ("tcp", "udp") else 0
    return Key(
        container, "out" if out else "in", c.dst if out else c.src, c.proto, port, "allowed", ""
    )


@dataclass
class Tally:
    first: float
    last: float
    connections: int = 0
    packets: int = 0
    bytes: int = 0


def key_of(container: str, p: LogPacket) -> Key | None:
    """The record a logged packet counts into; None for a prefix segd did not render."""
    tag = nflog.parse(p.prefix)
    if tag is None:
        return None
    proto = _PROTOS.get(p.proto, "other")
    peer = p.src if tag.direction == "in" else p.dst
    port = p.dport if proto in ("tcp", "udp") else 0
    return Key(container, tag.direction, peer, proto, port, tag.verdict, tag.rule_id)


@dataclass(frozen=True)
class Directory:
    """Who is who, from the instructions: local containers' workloads and the
    workload behind each address the instructions name; the local containers
    whose connections are counted whole (`enhanced`, with a table) and their
    addresses."""

    workloads: Mapping[str, str]  # container id -> workload id
    by_ip: Mapping[str, str]  # address -> workload id
    counted: Mapping[str, frozenset[str]] = field(default_factory=dict)  # container -> its ips

    @classmethod
    def of(cls, instr: Instructions | None) -> Directory:
        if instr is None:
            return cls({}, {})
        by_ip = {ip: w.workload_id for w in instr.workloads for ip in w.ips}
        counted = {
            w.container_id: frozenset(w.ips)
            for w in instr.workloads
            if w.visibility == "enhanced" and w.mode != "idle"
        }
        return cls({w.container_id: w.workload_id for w in instr.workloads}, by_ip, counted)


def batch_name() -> str:
    return secrets.token_urlsafe(16)


@dataclass
class Flows:
    """The current interval's records and the batches waiting to be sent."""

    max_keys: int = 20_000
    max_queued: int = 50_000
    max_conns: int = 100_000
    current: dict[Key, Tally] = field(default_factory=dict)
    queue: deque[list[FlowRecordIn]] = field(default_factory=deque)
    queued: int = 0  # records in `queue`
    lost: int = 0  # records (or overruns) dropped since the last batch was taken
    lost_total: int = 0
    ignored: int = 0  # packets with a prefix segd did not render
    # Containers whose connections conntrack counts (`Directory.counted`).
    counted: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Per counted container: its accepted connections -> the record their first
    # packet opened; its open connections (conntrack id) -> (packets, bytes) counted.
    opened: dict[str, dict[Conn, Key]] = field(default_factory=dict)
    running: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)
    # Per counted container: logged connections past `max_conns` (not remembered);
    # as many connections conntrack reports with no log are not counted again.
    unremembered: dict[str, int] = field(default_factory=dict)
    offered: FlowBatchIn | None = None  # the batch out to the server, its answer not heard
    names: Callable[[], str] = batch_name
    # While a dump runs: per container, the connections that ended and those
    # first logged meanwhile.
    dumping: bool = False
    ended_meanwhile: dict[str, set[int]] = field(default_factory=dict)
    logged_meanwhile: dict[str, set[Conn]] = field(default_factory=dict)

    def count(self, container: str, packets: Iterable[LogPacket], now: float) -> None:
        """Count packets one container's table logged at `now`."""
        opened = self.opened.setdefault(container, {}) if container in self.counted else None
        for p in packets:
            key = key_of(container, p)
            if key is None:
                self.ignored += 1
                continue
            t = self._tally(key, now)
            if t is None:
                continue
            t.connections += 1
            if opened is not None and key.verdict != "blocked":
                # conntrack counts this connection's packets and bytes, this one included
                if len(opened) < self.max_conns:
                    conn = Conn(key.proto, p.src, p.sport, p.dst, p.dport)
                    opened[conn] = key
                    if self.dumping:
                        self.logged_meanwhile.setdefault(container, set()).add(conn)
                else:
                    self.unremembered[container] = self.unremembered.get(container, 0) + 1
                continue
            t.packets += 1
            t.bytes += p.length

    def count_connections(
        self, container: str, entries: Iterable[CtEntry], now: float, *, dump: bool = False
    ) -> None:
        """Count what conntrack says of a counted container's connections: those
        that ended (DESTROY events), or, with `dump`, every one still open (a
        connection remembered but not in the dump ended unseen: forgotten)."""
        ips = self.counted.get(container)
        if ips is None:
            return  # not (or no longer) counted
        entries = list(entries)
        ended = self.ended_meanwhile.get(container, set()) if dump else set()
        for e in entries:
            if e.id in ended:
                continue  # it ended while the dump ran: counted then
            if e.ended and self.dumping and not dump:
                self.ended_meanwhile.setdefault(container, set()).add(e.id)
            self._count_entry(container, ips, e, now)
        if dump:
            ids = {e.id for e in entries}
            conns = {_conn(e) for e in entries} | self.logged_meanwhile.get(container, set())
            running = self.running.get(container, {})
            self.running[container] = {i: v for i, v in running.items() if i in ids}
            opened = self.opened.get(container, {})
            self.opened[container] = {c: k for c, k in opened.items() if c in conns}

    def _count_entry(self, container: str, ips: frozenset[str], e: CtEntry, now: float) -> None:
        """Count one conntrack entry into its record: what grew since it was last seen."""
        opened = self.opened.setdefault(container, {})
        running = self.running.setdefault(container, {})
        before = running.pop(e.id, None) if e.ended else running.get(e.id)
        if before is None and not e.ended and len(running) >= self.max_conns:
            return  # counted once, when it ends
        conn = _conn(e)
        key = opened.pop(conn, None) if e.ended else opened.get(conn)
        first = key is None and before is None  # a connection no log opened: count it
        if first and self.unremembered.get(container):
            self.unremembered[container] -= 1  # one its log counted, not remembered
            first = False
        t = self._tally(key or _unlogged(container, conn, ips), now)
        if t is None:
            return
        packets, size = before or (0, 0)
        if e.packets < packets or e.bytes < size:  # an id used again: a new entry
            packets = size = 0
        t.packets += e.packets - packets
        t.bytes += e.bytes - size
        t.connections += first
        if not e.ended:
            running[e.id] = (e.packets, e.bytes)

    def dump_started(self) -> None:
        """A dump of the open connections begins: note what changes meanwhile."""
        self.dumping = True
        self.ended_meanwhile = {}
        self.logged_meanwhile = {}

    def count_open(self, found: Mapping[str, Iterable[CtEntry]], now: float) -> None:
        """Count what the dump begun at `dump_started` found still open."""
        for container, entries in found.items():
            self.count_connections(container, entries, now, dump=True)
        self.dump_ended()

    def dump_ended(self) -> None:
        self.dumping = False
        self.ended_meanwhile = {}
        self.logged_meanwhile = {}

    def recount(self, counted: Mapping[str, frozenset[str]]) -> None:
        """The containers counted now (from new instructions): forget what was
        kept of the others' connections."""
        self.counted = counted
        kept: dict[str, Any]
        for kept in (self.opened, self.running, self.unremembered):
            for container in [c for c in kept if c not in counted]:
                del kept[container]

    def _tally(self, key: Key, now: float) -> Tally | None:
        t = self.current.get(key)
        if t is None:
            if len(self.current) >= self.max_keys:
                self._lose(1)
                return None
            t = self.current[key] = Tally(now, now)
        t.last = max(t.last, now)  # the clock stepped back: never before `first`
        return t

    def overrun(self, n: int) -> None:
        """The reader lost messages (ENOBUFS): `n` overruns, counted as lost."""
        self._lose(n)

    def _lose(self, n: int) -> None:
        self.lost += n
        self.lost_total += n

    def close_interval(self, directory: Directory) -> int:
        """Turn the interval's records into batches on the queue; how many records."""
        records = [_record(k, t, directory) for k, t in sorted(self.current.items())]
        self.current = {}
        for i in range(0, len(records), MAX_FLOW_BATCH):
            self.queue.append(records[i : i + MAX_FLOW_BATCH])
            self.queued += len(self.queue[-1])
        while self.queued > self.max_queued:
            # The oldest go first, but not the one out to the server (it may keep it).
            i = 1 if self._out_is_first() and len(self.queue) > 1 else 0
            if i == 0:
                self.offered = None
            dropped = self.queue[i]
            del self.queue[i]
            self._lose(len(dropped))
            self.queued -= len(dropped)
        return len(records)

    def _out_is_first(self) -> bool:
        return bool(self.offered and self.queue and self.offered.records is self.queue[0])

    def next_batch(self) -> FlowBatchIn | None:
        """The oldest batch to send (with what was lost so far), or None. It stays
        queued until `sent`, and is offered again as it was until then."""
        if self.offered is not None:
            return self.offered
        if not self.queue and not self.lost:
            return None
        self.offered = FlowBatchIn(
            records=self.queue[0] if self.queue else [], lost=self.lost, batch_id=self.names()
        )
        return self.offered

    def sent(self, batch: FlowBatchIn) -> None:
        """The server took `batch` (from `next_batch`)."""
        self.lost -= min(self.lost, batch.lost)
        if self.queue and batch.records is self.queue[0]:
            self.queued -= len(self.queue.popleft())
        if batch is self.offered:
            self.offered = None

    def refused(self, batch: FlowBatchIn) -> None:
        """The server refused `batch` (from `next_batch`): its records are lost;
        the count of what was lost before stays to be reported."""
        self.sent(batch)
        self.lost += batch.lost
        self._lose(len(batch.records))


def _record(k: Key, t: Tally, d: Directory) -> FlowRecordIn:
    return FlowRecordIn(
        container_id=k.container_id,
        direction=k.direction,
        peer_ip=k.peer_ip,
        proto=k.proto,
        port=k.port,
        verdict=k.verdict,
        connections=t.connections,
        first_seen=t.first,
        last_seen=t.last,
        workload_id=d.workloads.get(k.container_id, ""),
        peer_workload_id=d.by_ip.get(k.peer_ip, ""),
        rule_id=k.rule_id,
        packets=t.packets,
        bytes=t.bytes,
    )
