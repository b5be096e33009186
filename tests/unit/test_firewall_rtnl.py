"""rtnetlink parsing (private to `segd.firewall.kernel`) on hand-built messages, and
one real socket (no root needed)."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

import pytest

from segd.firewall.kernel import _rtnl as rtnl
from segd.firewall.kernel._rtnl import Address, Link, RtnlError


def attr(typ: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), typ) + value
    return raw + b"\0" * (rtnl.align(len(raw)) - len(raw))


def s32(n: int) -> bytes:
    return struct.pack("=i", n)


def ifinfo(index: int, *attrs: bytes) -> bytes:
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 1, index, 0, 0) + b"".join(attrs)


def ifaddr(family: int, index: int, scope: int, *attrs: bytes) -> bytes:
    return struct.pack("=BBBBI", family, 24, 0, scope, index) + b"".join(attrs)


def nlmsg(typ: int, seq: int, payload: bytes, flags: int = 0) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(payload), typ, flags, seq, 0) + payload
    return raw + b"\0" * (rtnl.align(len(raw)) - len(raw))


NESTED = 0x8000
FE80_1 = ipaddress.ip_address("fe80::1").packed

LINKS: list[tuple[str, bytes, Link]] = [
    (
        "a container's veth: kind, peer index and the peer's namespace",
        ifinfo(
            7,
            attr(rtnl.IFLA_IFNAME, b"eth0\0"),
            attr(rtnl.IFLA_LINK, s32(42)),
            attr(rtnl.IFLA_LINKINFO | NESTED, attr(rtnl.IFLA_INFO_KIND, b"veth")),
            attr(rtnl.IFLA_LINK_NETNSID, s32(0)),
        ),
        Link(7, "eth0", "veth", 42, 0),
    ),
    (
        "loopback: no kind, no peer",
        ifinfo(1, attr(rtnl.IFLA_IFNAME, b"lo\0")),
        Link(1, "lo", None, None, None),
    ),
    (
        "a veth with both ends here: no IFLA_LINK_NETNSID",
        ifinfo(
            9,
            attr(rtnl.IFLA_IFNAME, b"in0\0"),
            attr(rtnl.IFLA_LINK, s32(10)),
            attr(rtnl.IFLA_LINKINFO, attr(rtnl.IFLA_INFO_KIND, b"veth\0")),
        ),
        Link(9, "in0", "veth", 10, None),
    ),
    (
        "unknown attributes are skipped",
        ifinfo(3, attr(99, b"\1\2\3"), attr(rtnl.IFLA_IFNAME, b"mv0\0"), attr(250, b"")),
        Link(3, "mv0", None, None, None),
    ),
]


@pytest.mark.parametrize(("body", "want"), [c[1:] for c in LINKS], ids=[c[0] for c in LINKS])
def test_parse_link(body: bytes, want: Link) -> None:
    assert rtnl.parse_link(body) == want


ADDRS: list[tuple[str, bytes, Address | None]] = [
    (
        "IPv4: IFA_LOCAL is the address, IFA_ADDRESS the far end of a point-to-point link",
        ifaddr(
            socket.AF_INET,
            7,
            0,
            attr(rtnl.IFA_ADDRESS, bytes([10, 0, 0, 9])),
            attr(rtnl.IFA_LOCAL, bytes([10, 0, 0, 2])),
        ),
        Address(7, 0, ipaddress.ip_address("10.0.0.2")),
    ),
    (
        "IPv6: IFA_ADDRESS only",
        ifaddr(
            socket.AF_INET6, 7, 253, attr(rtnl.IFA_ADDRESS, bytes([0xFE, 0x80] + [0] * 13 + [1]))
        ),
        Address(7, 253, ipaddress.ip_address("fe80::1")),
    ),
    ("another family", ifaddr(socket.AF_PACKET, 7, 0), None),
]


@pytest.mark.parametrize(("body", "want"), [c[1:] for c in ADDRS], ids=[c[0] for c in ADDRS])
def test_parse_address(body: bytes, want: Address | None) -> None:
    assert rtnl.parse_address(body) == want


@pytest.mark.parametrize(
    "body",
    [
        b"\0" * 7,  # shorter than ifaddrmsg
        ifaddr(socket.AF_INET, 1, 0),  # no address at all
        ifaddr(socket.AF_INET, 1, 0, attr(rtnl.IFA_LOCAL, bytes(16))),  # wrong length
        ifaddr(socket.AF_INET, 1, 0, struct.pack("=HH", 40, rtnl.IFA_LOCAL) + bytes(4)),
        ifaddr(socket.AF_INET, 1, 0, struct.pack("=HH", 2, rtnl.IFA_LOCAL) + bytes(4)),
    ],
)
def test_malformed_addresses_raise(body: bytes) -> None:
    with pytest.raises(RtnlError):
        rtnl.parse_address(body)


@pytest.mark.parametrize(
    "body",
    [
        b"\0" * 15,
        ifinfo(1, attr(rtnl.IFLA_LINK, b"\1\2")),  # not 32 bits
        ifinfo(1, struct.pack("=HH", 200, rtnl.IFLA_IFNAME) + b"lo\0\0"),
    ],
)
def test_malformed_links_raise(body: bytes) -> None:
    with pytest.raises(RtnlError):
        rtnl.parse_link(body)


def test_parse_nsid() -> None:
    head = struct.pack("=Bxxx", socket.AF_UNSPEC)
    assert rtnl.parse_nsid(head + attr(rtnl.NETNSA_NSID, s32(3))) == 3
    assert rtnl.parse_nsid(head + attr(rtnl.NETNSA_NSID, s32(-1))) is None  # not assigned
    with pytest.raises(RtnlError):
        rtnl.parse_nsid(head)


def test_messages_split_a_datagram() -> None:
    data = nlmsg(16, 5, b"abc") + nlmsg(rtnl.NLMSG_DONE, 5, s32(0), flags=2)
    assert rtnl.messages(data) == [
        (16, 0, 5, b"abc"),
        (rtnl.NLMSG_DONE, 2, 5, s32(0)),
    ]
    with pytest.raises(RtnlError):
        rtnl.messages(struct.pack("=IHHII", 64, 16, 0, 1, 0))  # longer than the datagram


def test_a_real_socket_lists_this_namespace() -> None:
    with rtnl.Rtnl() as nl:
        links = nl.links()
        addresses = nl.addresses()
        lo = next(link for link in links if link.name == "lo")
        assert lo.index == socket.if_nametoindex("lo")
        assert lo.peer is None
        loopback = [a for a in addresses if a.index == lo.index]
        if loopback:  # a namespace with lo down has none
            assert all(a.scope == rtnl.RT_SCOPE_HOST for a in loopback)


def test_a_refused_request_raises_with_the_errno() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with rtnl.Rtnl() as nl, pytest.raises(RtnlError) as err:
            nl.nsid(fd)  # not a namespace
    finally:
        os.close(fd)
    assert err.value.errno is not None and err.value.errno > 0


class FakeKernel:
    """Stands in for the netlink socket: answers each request with scripted datagrams."""

    def __init__(self, answers: list[list[bytes]]) -> None:
        self.answers = answers  # per request: its datagrams
        self.sent: list[bytes] = []
        self.queue: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(data)
        seq = struct.unpack_from("=IHHII", data)[3]
        mark, real = struct.pack("=I", SEQ), struct.pack("=I", seq)
        self.queue = [d.replace(mark, real) for d in self.answers.pop(0)]

    def recvmsg(self, _size: int) -> tuple[bytes, list[object], int, object]:
        return self.queue.pop(0), [], 0, None

    def close(self) -> None:
        pass


SEQ = 0x5E05E0  # stands for the request's sequence number


def scripted(typ: int, payload: bytes, flags: int = 0) -> bytes:
    """An answer to the current request (FakeKernel fills in its seq)."""
    return nlmsg(typ, SEQ, payload, flags)


def fake_rtnl(answers: list[list[bytes]]) -> tuple[rtnl.Rtnl, FakeKernel]:
    nl = rtnl.Rtnl()
    nl.close()
    kernel = FakeKernel(answers)
    nl._sock = kernel  # type: ignore[assignment]
    return nl, kernel


def test_an_interrupted_dump_is_read_again_and_stale_answers_are_skipped() -> None:
    lo = ifinfo(1, attr(rtnl.IFLA_IFNAME, b"lo\0"))
    eth = ifinfo(2, attr(rtnl.IFLA_IFNAME, b"eth0\0"))
    done = scripted(rtnl.NLMSG_DONE, s32(0), rtnl.NLM_F_MULTI)
    nl, kernel = fake_rtnl(
        [
            [scripted(rtnl.RTM_NEWLINK, lo, rtnl.NLM_F_MULTI | rtnl.NLM_F_DUMP_INTR), done],
            [nlmsg(rtnl.RTM_NEWLINK, 999, eth) + scripted(rtnl.RTM_NEWLINK, lo), done],
        ]
    )
    assert nl.links() == [Link(1, "lo", None, None, None)]
    assert len(kernel.sent) == 2


def test_a_dump_that_never_settles_raises() -> None:
    lo = ifinfo(1, attr(rtnl.IFLA_IFNAME, b"lo\0"))
    done = scripted(rtnl.NLMSG_DONE, s32(0))
    intr = scripted(rtnl.RTM_NEWLINK, lo, rtnl.NLM_F_DUMP_INTR)
    nl, _ = fake_rtnl([[intr, done]] * 3)
    with pytest.raises(RtnlError, match="kept changing"):
        nl.links()


def test_an_error_answer_raises() -> None:
    nl, _ = fake_rtnl([[scripted(rtnl.NLMSG_ERROR, s32(-1) + bytes(16))]])
    with pytest.raises(RtnlError) as err:
        nl.addresses()
    assert err.value.errno == 1


def test_a_dump_that_fails_part_way_raises() -> None:
    lo = ifinfo(1, attr(rtnl.IFLA_IFNAME, b"lo\0"))
    nl, _ = fake_rtnl([[scripted(rtnl.RTM_NEWLINK, lo), scripted(rtnl.NLMSG_DONE, s32(-90))]])
    with pytest.raises(RtnlError) as err:
        nl.links()
    assert err.value.errno == 90
