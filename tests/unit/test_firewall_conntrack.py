"""ctnetlink messages read back into connection entries, on hand-built messages;
what the kernel module says when the kernel has no conntrack."""

from __future__ import annotations

import ipaddress
import random
import socket
import struct

import pytest

from segd.firewall import conntrack as ct
from segd.firewall.conntrack import CtEntry
from segd.firewall.kernel._conntrack import ConntrackError, enable_accounting

NESTED = 0x8000
NEW = (ct.NFNL_SUBSYS_CTNETLINK << 8) | ct.IPCTNL_MSG_CT_NEW
DELETE = (ct.NFNL_SUBSYS_CTNETLINK << 8) | ct.IPCTNL_MSG_CT_DELETE


def attr(typ: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), typ) + value
    return raw + b"\0" * (-len(raw) % 4)


def nest(typ: int, *attrs: bytes) -> bytes:
    return attr(typ | NESTED, b"".join(attrs))


def be(n: int, size: int) -> bytes:
    return n.to_bytes(size, "big")


def tuple_attr(
    typ: int, src: str, dst: str, proto: int, sport: int | None = None, dport: int | None = None
) -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    kinds = (ct.CTA_IP_V4_SRC, ct.CTA_IP_V4_DST) if a.version == 4 else (3, 4)
    ports = b""
    if sport is not None and dport is not None:
        ports = attr(ct.CTA_PROTO_SRC_PORT, be(sport, 2)) + attr(
            ct.CTA_PROTO_DST_PORT, be(dport, 2)
        )
    return nest(
        typ,
        nest(ct.CTA_TUPLE_IP, attr(kinds[0], a.packed), attr(kinds[1], b.packed)),
        nest(ct.CTA_TUPLE_PROTO, attr(ct.CTA_PROTO_NUM, bytes([proto])), ports),
    )


def counters(typ: int, packets: int, nbytes: int) -> bytes:
    return nest(
        typ,
        attr(ct.CTA_COUNTERS_PACKETS, be(packets, 8)),
        attr(ct.CTA_COUNTERS_BYTES, be(nbytes, 8)),
    )


def nlmsg(kind: int, *attrs: bytes, seq: int = 0, family: int = socket.AF_INET) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body


def conn(kind: int = DELETE, *, seq: int = 0, with_counters: bool = True) -> bytes:
    """A TCP connection 10.0.0.1:40000 -> 10.0.0.2:5432, id 77, 7+5 packets, 900+300 bytes."""
    parts = [
        tuple_attr(ct.CTA_TUPLE_ORIG, "10.0.0.1", "10.0.0.2", 6, 40000, 5432),
        tuple_attr(2, "10.0.0.2", "10.0.0.1", 6, 5432, 40000),  # CTA_TUPLE_REPLY
        attr(3, be(0x18E, 4)),  # CTA_STATUS
    ]
    if with_counters:
        parts += [counters(ct.CTA_COUNTERS_ORIG, 7, 900), counters(ct.CTA_COUNTERS_REPLY, 5, 300)]
    return nlmsg(kind, *parts, attr(ct.CTA_ID, be(77, 4)), seq=seq)


TCP = CtEntry(77, "tcp", "10.0.0.1", "10.0.0.2", 40000, 5432, 12, 1200, True)


def test_a_destroy_event_is_an_ended_entry_with_both_directions_summed() -> None:
    assert list(ct.parse(conn())) == [TCP]


def test_a_dump_reply_is_a_running_entry() -> None:
    assert list(ct.parse(conn(NEW))) == [TCP._replace(ended=False)]


def test_without_accounting_the_counters_are_zero() -> None:
    assert list(ct.parse(conn(with_counters=False))) == [TCP._replace(packets=0, bytes=0)]


@pytest.mark.parametrize(
    ("proto", "ports", "name", "want_ports"),
    [
        (17, (53000, 53), "udp", (53000, 53)),
        (58, None, "icmp", (0, 0)),
        (1, None, "icmp", (0, 0)),
        (132, (1, 2), "other", (0, 0)),  # sctp: ports not kept
    ],
)
def test_protocols_and_ports(
    proto: int, ports: tuple[int, int] | None, name: str, want_ports: tuple[int, int]
) -> None:
    src, dst = ("fd10:213::1", "fd10:213::2") if proto == 58 else ("10.0.0.1", "10.0.0.2")
    sport, dport = ports or (None, None)
    msg = nlmsg(DELETE, tuple_attr(ct.CTA_TUPLE_ORIG, src, dst, proto, sport, dport))
    assert list(ct.parse(msg)) == [CtEntry(0, name, src, dst, *want_ports, 0, 0, True)]


def test_ipv6_addresses_are_canonical_text() -> None:
    msg = nlmsg(DELETE, tuple_attr(ct.CTA_TUPLE_ORIG, "FD10:0213::0001", "fd10:213::2", 6, 1, 2))
    assert [(e.src, e.dst) for e in ct.parse(msg)] == [("fd10:213::1", "fd10:213::2")]


def test_several_messages_in_one_datagram_and_others_skipped() -> None:
    other = nlmsg((ct.NFNL_SUBSYS_CTNETLINK << 8) | 5)  # stats
    data = conn() + other + conn(NEW) + done(0)
    assert list(ct.parse(data)) == [TCP, TCP._replace(ended=False)]


def done(seq: int) -> bytes:
    return struct.pack("=IHHIIi", 20, ct.NLMSG_DONE, 2, seq, 0, 0)


def test_a_dump_reply_is_read_to_its_end_for_its_own_request_only() -> None:
    running = TCP._replace(ended=False)
    assert ct.read_dump(conn(NEW, seq=9) + conn(NEW, seq=8), 9) == ([running], None)
    assert ct.read_dump(conn(NEW, seq=9) + done(9), 9) == ([running], 0)
    assert ct.read_dump(conn(NEW, seq=8) + done(8), 9) == ([], None)  # an earlier request's
    error = struct.pack("=IHHIIi", 20, ct.NLMSG_ERROR, 0, 9, 0, -95)
    assert ct.read_dump(error, 9) == ([], 95)


def test_requests() -> None:
    n, kind, flags, seq, pid, family, version, res = struct.unpack("=IHHIIBBH", ct.dump_request(4))
    assert (n, kind, flags, seq, pid) == (20, (1 << 8) | 1, 0x301, 4, 0)
    assert (family, version, res) == (socket.AF_UNSPEC, 0, 0)
    _, kind, flags, *_ = struct.unpack("=IHHIIBBH", ct.stats_request(5))
    assert (kind, flags) == ((1 << 8) | 5, 0x5)


GARBAGE = [
    b"",
    b"\0" * 3,
    conn()[:-1],  # truncated: its length says more than there is
    struct.pack("=IHHII", 8, DELETE, 0, 0, 0),  # a length shorter than the header
    nlmsg(DELETE),  # no attributes
    nlmsg(DELETE)[:18],  # not even a whole nfgenmsg
    nlmsg(DELETE, attr(ct.CTA_TUPLE_ORIG | NESTED, b"\xff" * 9)),
    nlmsg(DELETE, nest(ct.CTA_TUPLE_ORIG, attr(ct.CTA_TUPLE_IP, b"\0" * 8))),
    nlmsg(
        DELETE,  # a v4 source with a v6 destination
        nest(
            ct.CTA_TUPLE_ORIG,
            nest(ct.CTA_TUPLE_IP, attr(1, b"\1" * 4), attr(4, b"\2" * 16)),
            nest(ct.CTA_TUPLE_PROTO, attr(ct.CTA_PROTO_NUM, b"\6")),
        ),
    ),
    nlmsg(
        DELETE,  # no protocol number
        nest(ct.CTA_TUPLE_ORIG, nest(ct.CTA_TUPLE_IP, attr(1, b"\1" * 4), attr(2, b"\2" * 4))),
    ),
]


@pytest.mark.parametrize("data", GARBAGE, ids=range(len(GARBAGE)))
def test_what_cannot_be_read_yields_nothing(data: bytes) -> None:
    assert list(ct.parse(data)) == []
    assert ct.read_dump(data, 0) == ([], None)


def test_random_bytes_never_raise() -> None:
    rng = random.Random(7)
    good = conn() + conn(NEW)
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = data[: rng.randint(0, len(data))]
        for e in ct.parse(bytes(data)):
            assert e.proto in ("tcp", "udp", "icmp", "other")
        ct.read_dump(bytes(data), 0)


def test_a_kernel_without_conntrack_is_said_so() -> None:
    """The kernel module logs this and leaves the namespace uncounted."""
    with pytest.raises(ConntrackError, match=r"conntrack is not in this kernel \(modprobe"):
        enable_accounting("/nonexistent/nf_conntrack_acct")
