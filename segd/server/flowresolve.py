"""From an agent's flow records to the flows the server keeps. Pure: no I/O.

`check` refuses a malformed batch as a whole (a message naming the record and
field; nothing is kept). `resolve` turns one record of host H into a
`wire.Flow` by the server's own model, not by the agent's say: the local end is
the workload of that container *on H* (else an unpaired container of H), the
peer the workload that holds the peer's address (else external). A record that
names a workload which is not that container's on H (another host's, or one
since unpaired) is refused: a host reports only its own containers.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from collections.abc import Callable, Mapping

import msgspec

from segd import wire
from segd.errors import InvalidInput
from segd.server import validate

MAX_ID = 64
MAX_COUNT = 2**62  # what SQLite's integers hold, with room to sum an hour's
FUTURE_S = 300.0  # how far ahead of the server clock a record may be stamped


def _ip(value: str, where: str) -> str:
    if value.count(".") == 3 and ":" not in value:  # the common case, in C
        try:
            return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, value))
        except OSError:
            pass  # let ipaddress word the refusal
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidInput(f"{where}.peer_ip: invalid IP address {value[:64]!r}") from None
    return str(addr)


def _id(value: str, field: str) -> None:
    if value and (len(value) > MAX_ID or not value.isprintable()):
        raise InvalidInput(f"{field}: at most {MAX_ID} printable characters")


def check(batch: wire.FlowBatchIn, now: float) -> list[wire.FlowRecordIn]:
    """The batch's records, addresses normalised; InvalidInput for the first bad one."""
    out = []
    ips: dict[str, str] = {}  # as given -> normalised (a batch names few peers, often)
    containers: set[str] = set()
    for i, r in enumerate(batch.records):
        where = f"records[{i}]"
        if r.container_id not in containers:
            validate.container_id(r.container_id, f"{where}.container_id")
            containers.add(r.container_id)
        for field in ("workload_id", "peer_workload_id", "rule_id"):
            _id(getattr(r, field), f"{where}.{field}")
        if max(r.connections, r.packets, r.bytes) > MAX_COUNT:
            raise InvalidInput(f"{where}: connections, packets and bytes: at most {MAX_COUNT}")
        if not (math.isfinite(r.first_seen) and math.isfinite(r.last_seen)):
            raise InvalidInput(f"{where}: first_seen and last_seen must be finite")
        if not 0 <= r.first_seen <= r.last_seen:
            raise InvalidInput(f"{where}: first_seen must be between 0 and last_seen")
        if r.last_seen > now + FUTURE_S:
            raise InvalidInput(f"{where}.last_seen: ahead of the server clock")
        ip = ips.get(r.peer_ip)
        if ip is None:
            ip = ips[r.peer_ip] = _ip(r.peer_ip, where)
        out.append(r if ip == r.peer_ip else _with_ip(r, ip))
    return out


def _with_ip(r: wire.FlowRecordIn, ip: str) -> wire.FlowRecordIn:
    return msgspec.structs.replace(r, peer_ip=ip)


def workload_end(w: wire.Workload, ip: str) -> wire.FlowEnd:
    """The flow end of a workload at one of its addresses."""
    return wire.FlowEnd(
        ip=ip,
        kind="workload",
        workload_id=w.id,
        labels=w.labels,
        host_id=w.host_id,
        container_id=w.container_id,
    )


def same_family(ips: list[str], peer: str) -> str:
    """The workload's address of the peer's family (v4 or v6), else its first."""
    v6 = ":" in peer
    return next((ip for ip in ips if (":" in ip) == v6), ips[0] if ips else "")


def peer_end(ip: str, owner: Callable[[str], wire.Workload | None]) -> wire.FlowEnd:
    w = owner(ip)
    return wire.FlowEnd(ip=ip, kind="external") if w is None else workload_end(w, ip)


def resolve(
    host_id: str,
    r: wire.FlowRecordIn,
    local: Mapping[str, wire.Workload],
    owner: Callable[[str], wire.Workload | None],
    peers: dict[str, wire.FlowEnd] | None = None,
    mine: dict[tuple[str, bool], wire.FlowEnd] | None = None,
) -> wire.Flow | None:
    """The flow of record `r` of host `host_id` (id 0 until stored), or None when
    it names a workload that is not its container's on that host.

    `local`: the host's workloads by container id; `owner`: the workload holding
    an address, if any; `peers` and `mine`, when given, caches of the ends
    resolved (peers by address, local ones by container and family), kept for
    one batch."""
    w = local.get(r.container_id)
    if r.workload_id and (w is None or w.id != r.workload_id):
        return None
    key = (r.container_id, ":" in r.peer_ip)
    me = mine.get(key) if mine is not None else None
    if me is None:
        if w is not None:
            me = workload_end(w, same_family(w.ips, r.peer_ip))
        else:
            me = wire.FlowEnd(ip="", kind="unpaired", host_id=host_id, container_id=r.container_id)
        if mine is not None:
            mine[key] = me
    if peers is None:
        peer = peer_end(r.peer_ip, owner)
    else:  # a batch's cache of peers resolved
        peer = peers.get(r.peer_ip) or peers.setdefault(r.peer_ip, peer_end(r.peer_ip, owner))
    src, dst = (me, peer) if r.direction == "out" else (peer, me)
    return wire.Flow(
        id=0,
        src=src,
        dst=dst,
        proto=r.proto,
        port=r.port,
        verdict=r.verdict,
        rule_id=r.rule_id,
        connections=r.connections,
        packets=r.packets,
        bytes=r.bytes,
        first_seen=r.first_seen,
        last_seen=r.last_seen,
        reported_by=host_id,
    )
