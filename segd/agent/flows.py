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

Memory is bounded: at most `max_keys` records per interval (a packet
that would open another is dropped and counted), at most `max_queued`
records waiting to be sent (the oldest batches go first, counted), and at
most `max_conns` connections remembered per container (beyond that a
connection is counted once, when it ends). What was dropped, and the reader's overruns, are
reported as `FlowBatchIn.lost`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

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
                    opened[Conn(key.proto, p.src, p.sport, p.dst, p.dport)] = key
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
        opened = self.opened.setdefault(container, {})
        running = self.running.setdefault(container, {})
        entries = list(entries)
        for e in entries:
            before = running.pop(e.id, None) if e.ended else running.get(e.id)
            if before is None and not e.ended and len(running) >= self.max_conns:
                continue  # counted once, when it ends
            conn = Conn(_PROTOS.get(e.proto, "other"), e.src, e.sport, e.dst, e.dport)
            key = opened.pop(conn, None) if e.ended else opened.get(conn)
            first = key is None and before is None  # a connection no log opened: count it
            if key is None:
                key = _unlogged(container, conn, ips)
            t = self._tally(key, now)
            if t is None:
                continue
            packets, size = before or (0, 0)
            if e.packets < packets or e.bytes < size:  # an id used again: a new entry
                packets = size = 0
            t.packets += e.packets - packets
            t.bytes += e.bytes - size
            t.connections += first
            if not e.ended:
                running[e.id] = (e.packets, e.bytes)
        if dump:
            ids = {e.id for e in entries}
            conns = {
                Conn(_PROTOS.get(e.proto, "other"), e.src, e.sport, e.dst, e.dport) for e in entries
            }
            self.running[container] = {i: v for i, v in running.items() if i in ids}
            self.opened[container] = {c: k for c, k in opened.items() if c in conns}

    def recount(self, counted: Mapping[str, frozenset[str]]) -> None:
        """The containers counted now (from new instructions): forget what was
        kept of the others' connections."""
        self.counted = counted
        for kept in (self.opened, self.running):
            for container in [c for c in kept if c not in counted]:
                del kept[container]

    def _tally(self, key: Key, now: float) -> Tally | None:
        t = self.current.get(key)
        if t is None:
            if len(self.current) >= self.max_keys:
                self._lose(1)
                return None
            t = self.current[key] = Tally(now, now)
        t.last = now
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
            self._lose(len(self.queue[0]))
            self.queued -= len(self.queue.popleft())
        return len(records)

    def next_batch(self) -> FlowBatchIn | None:
        """The oldest batch to send (with what was lost so far), or None.
        It stays queued until `sent`."""
        if not self.queue and not self.lost:
            return None
        return FlowBatchIn(records=self.queue[0] if self.queue else [], lost=self.lost)

    def sent(self, batch: FlowBatchIn) -> None:
        """The server took `batch` (from `next_batch`)."""
        self.lost -= min(self.lost, batch.lost)
        if self.queue and batch.records is self.queue[0]:
            self.queued -= len(self.queue.popleft())

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
