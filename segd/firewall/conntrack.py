"""Connection counts from conntrack, as ctnetlink messages read back (pure).

At visibility level `enhanced` a workload's namespace counts its connections:
the kernel's connection tracker keeps, per connection, packets and bytes in
each direction once `net.netfilter.nf_conntrack_acct` is 1 there, and tells
them over ctnetlink (NETLINK_NETFILTER, subsystem `NFNL_SUBSYS_CTNETLINK`):
final counters in a destroy event (`IPCTNL_MSG_CT_DELETE`, multicast group
`DESTROY_GROUP`) when a connection ends, running counters in the replies to a
dump (`IPCTNL_MSG_CT_NEW`) for those still open. A connection the table
dropped never gets an entry. The kernel module opens the sockets
(`segd.firewall.kernel`); this module builds the dump request and reads the
messages (linux/netfilter/nfnetlink_conntrack.h), without raising on what it
cannot read.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from typing import NamedTuple

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
IPCTNL_MSG_CT_GET_STATS = 5
DESTROY_GROUP = 3  # NFNLGRP_CONNTRACK_DESTROY

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR = 2
NLMSG_DONE = 3

CTA_TUPLE_ORIG = 1
CTA_COUNTERS_ORIG = 9
CTA_COUNTERS_REPLY = 10
CTA_ID = 12
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_COUNTERS_PACKETS = 1
CTA_COUNTERS_BYTES = 2

_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")  # family, version, res_id
_NLA = struct.Struct("=HH")
_PROTOS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}
_ADDRS = {4: (CTA_IP_V4_SRC, CTA_IP_V4_DST), 16: (CTA_IP_V6_SRC, CTA_IP_V6_DST)}


class CtEntry(NamedTuple):
    """One conntrack entry of a namespace: its original direction's addresses,
    protocol and ports, and its counters (both directions summed)."""

    id: int  # CTA_ID
    proto: str  # "tcp", "udp", "icmp" or "other"
    src: str  # original direction (the side that opened it)
    dst: str
    sport: int  # 0 for icmp/other
    dport: int
    packets: int  # orig + reply
    bytes: int  # orig + reply
    ended: bool  # a DESTROY event (final counters); False: from a dump (running)


def request(msg: int, seq: int, flags: int) -> bytes:
    """A ctnetlink request of type `msg` (IPCTNL_MSG_CT_*), for both IPv4 and IPv6."""
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0)
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | msg
    return _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body


def dump_request(seq: int) -> bytes:
    """IPCTNL_MSG_CT_GET as a dump of every entry, IPv4 and IPv6 (AF_UNSPEC)."""
    return request(IPCTNL_MSG_CT_GET, seq, NLM_F_DUMP)


def stats_request(seq: int) -> bytes:
    """The table's statistics, acknowledged: answered only when ctnetlink is there."""
    return request(IPCTNL_MSG_CT_GET_STATS, seq, NLM_F_ACK)


def _attrs(data: bytes) -> dict[int, bytes]:
    """The attributes in `data` by type (the nested flag masked off)."""
    out: dict[int, bytes] = {}
    off = 0
    while off + _NLA.size <= len(data):
        n, kind = _NLA.unpack_from(data, off)
        if n < _NLA.size or off + n > len(data):
            break
        out[kind & 0x3FFF] = data[off + _NLA.size : off + n]
        off += (n + 3) & ~3
    return out


def _be(raw: bytes | None, size: int) -> int | None:
    return int.from_bytes(raw, "big") if raw is not None and len(raw) == size else None


def _tuple(raw: bytes) -> tuple[str, str, str, int, int] | None:
    """(proto, src, dst, sport, dport) of a CTA_TUPLE_* nest."""
    nest = _attrs(raw)
    ip = _attrs(nest.get(CTA_TUPLE_IP, b""))
    l4 = _attrs(nest.get(CTA_TUPLE_PROTO, b""))
    num = _be(l4.get(CTA_PROTO_NUM), 1)
    src_raw = ip.get(CTA_IP_V4_SRC, ip.get(CTA_IP_V6_SRC, b""))
    kinds = _ADDRS.get(len(src_raw))
    if num is None or kinds is None:
        return None
    dst_raw = ip.get(kinds[1], b"")
    if len(dst_raw) != len(src_raw) or kinds[0] not in ip:
        return None
    proto = _PROTOS.get(num, "other")
    sport = dport = 0
    if proto in ("tcp", "udp"):
        sport = _be(l4.get(CTA_PROTO_SRC_PORT), 2) or 0
        dport = _be(l4.get(CTA_PROTO_DST_PORT), 2) or 0
    src, dst = ipaddress.ip_address(src_raw), ipaddress.ip_address(dst_raw)
    return proto, str(src), str(dst), sport, dport


def _counters(raw: bytes | None) -> tuple[int, int]:
    """(packets, bytes) of a CTA_COUNTERS_* nest; zeros when absent (no accounting)."""
    nest = _attrs(raw or b"")
    packets = _be(nest.get(CTA_COUNTERS_PACKETS), 8) or 0
    return packets, _be(nest.get(CTA_COUNTERS_BYTES), 8) or 0


def entry(body: bytes, ended: bool) -> CtEntry | None:
    """The entry in one message's attributes (after its nfgenmsg); None if unreadable."""
    a = _attrs(body)
    orig = _tuple(a.get(CTA_TUPLE_ORIG, b""))
    if orig is None:
        return None
    p1, b1 = _counters(a.get(CTA_COUNTERS_ORIG))
    p2, b2 = _counters(a.get(CTA_COUNTERS_REPLY))
    return CtEntry(_be(a.get(CTA_ID), 4) or 0, *orig, p1 + p2, b1 + b2, ended)


class Message(NamedTuple):
    """One netlink message: its type, sequence number and what follows its header."""

    kind: int
    seq: int
    body: bytes


def messages(data: bytes) -> Iterator[Message]:
    """The whole messages in one datagram; a truncated one ends it."""
    off = 0
    while off + _NLMSG.size <= len(data):
        n, kind, _flags, seq, _pid = _NLMSG.unpack_from(data, off)
        if n < _NLMSG.size or off + n > len(data):
            return
        yield Message(kind, seq, data[off + _NLMSG.size : off + n])
        off += (n + 3) & ~3


_KINDS = {
    (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW: False,
    (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE: True,
}


def _entry_of(m: Message) -> CtEntry | None:
    ended = _KINDS.get(m.kind)
    if ended is None or len(m.body) < _NFGEN.size:
        return None
    return entry(m.body[_NFGEN.size :], ended)


def parse(data: bytes) -> Iterator[CtEntry]:
    """The entries in one datagram from a ctnetlink socket: dump replies (running)
    and destroy events (ended); anything else is skipped."""
    for m in messages(data):
        found = _entry_of(m)
        if found is not None:
            yield found


def read_dump(data: bytes, seq: int) -> tuple[list[CtEntry], int | None]:
    """The entries in one datagram of the reply to dump request `seq`, and whether
    the reply ends there: 0 at NLMSG_DONE, the errno of an NLMSG_ERROR, None when
    more is to come. Messages of other requests (an earlier one given up) are skipped."""
    found: list[CtEntry] = []
    for m in messages(data):
        if m.seq != seq:
            continue
        if m.kind == NLMSG_DONE:
            return found, 0
        if m.kind == NLMSG_ERROR:
            code = struct.unpack_from("=i", m.body)[0] if len(m.body) >= 4 else 0
            return found, -code
        e = _entry_of(m)
        if e is not None:
            found.append(e)
    return found, None
