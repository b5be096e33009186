"""The WireGuard cross-platform control protocol (wireguard-go's UAPI socket,
`/var/run/wireguard/NAME.sock`), as pure text in and out.

A request is `set=1` or `get=1` and `key=value` lines, ended by an empty line;
the answer ends with `errno=N` and an empty line. Keys are hex. A `set` with
`replace_peers=true` makes the peer list exactly the one that follows.
"""

from __future__ import annotations

import msgspec

from segd.errors import InvalidInput

KEEPALIVE_S = 25


class Peer(msgspec.Struct, frozen=True, order=True):
    public_key: bytes  # 32 bytes
    endpoint: str  # "IP:PORT", IPv6 as "[IP]:PORT"
    allowed_ips: tuple[str, ...]
    keepalive_s: int = KEEPALIVE_S


class Device(msgspec.Struct, frozen=True):
    """What `get=1` reports (the part segd sets, plus each peer's last handshake)."""

    private_key: bytes
    listen_port: int
    peers: tuple[Peer, ...]
    handshakes: dict[bytes, int] = {}  # peer public key -> last handshake (unix s; 0 never)


class UapiError(Exception):
    """The device refused a request (`errno` not 0) or answered nonsense."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or f"errno={errno}")
        self.errno = errno


def set_request(private_key: bytes, listen_port: int, peers: list[Peer]) -> bytes:
    """The whole device: its key, port and exactly `peers` (replace_peers)."""
    _check(private_key, listen_port)
    lines = ["set=1", f"private_key={private_key.hex()}", f"listen_port={listen_port}"]
    lines.append("replace_peers=true")
    for p in sorted(peers):
        lines += _peer_lines(p)
    return _encode(lines)


def update_request(
    have: Device, private_key: bytes, listen_port: int, peers: list[Peer]
) -> bytes | None:
    """The same end state as `set_request` from what the device has now, touching
    only what differs: peers that stay keep their sessions (a `replace_peers`
    drops every session, and a re-handshake can take seconds), and the port is
    not rebound when it is already right. None when nothing differs."""
    _check(private_key, listen_port)
    want = {p.public_key: p for p in peers}
    current = {p.public_key: p for p in have.peers}
    lines = ["set=1"]
    if have.private_key != private_key:
        lines.append(f"private_key={private_key.hex()}")
    if have.listen_port != listen_port:
        lines.append(f"listen_port={listen_port}")
    for key in sorted(set(current) - set(want)):
        lines += [f"public_key={key.hex()}", "remove=true"]
    for key, p in sorted(want.items()):
        old = current.get(key)
        if old is not None and (old.endpoint, old.allowed_ips, old.keepalive_s) == (
            p.endpoint,
            p.allowed_ips,
            p.keepalive_s,
        ):
            continue
        lines += _peer_lines(p)
    if len(lines) == 1:
        return None
    return _encode(lines)


def _check(private_key: bytes, listen_port: int) -> None:
    if len(private_key) != 32:
        raise InvalidInput("private key must be 32 bytes")
    if not 0 <= listen_port <= 65535:
        raise InvalidInput(f"listen port {listen_port} out of range")


def _peer_lines(p: Peer) -> list[str]:
    if len(p.public_key) != 32:
        raise InvalidInput("peer public key must be 32 bytes")
    return [
        f"public_key={p.public_key.hex()}",
        f"endpoint={p.endpoint}",
        f"persistent_keepalive_interval={p.keepalive_s}",
        "replace_allowed_ips=true",
        *(f"allowed_ip={a}" for a in p.allowed_ips),
    ]


def _encode(lines: list[str]) -> bytes:
    for line in lines:
        if "\n" in line or "=" not in line:
            raise InvalidInput(f"invalid UAPI line {line!r}")
    return ("\n".join(lines) + "\n\n").encode()


GET_REQUEST = b"get=1\n\n"


def complete(buf: bytes) -> bool:
    """Whether an answer has arrived whole (it ends with an empty line)."""
    return buf.endswith(b"\n\n") or buf == b"\n"


def check_errno(answer: bytes) -> None:
    """Raise UapiError unless the answer ends with `errno=0`."""
    errno = _errno(_pairs(answer))
    if errno != 0:
        raise UapiError(errno)


def parse_get(answer: bytes) -> Device:
    """The device from a `get=1` answer; UapiError on `errno` != 0 or bad text."""
    pairs = _pairs(answer)
    errno = _errno(pairs)
    if errno != 0:
        raise UapiError(errno)
    sections: list[list[tuple[str, str]]] = [[]]
    for k, v in pairs:
        if k == "public_key":
            sections.append([])
        sections[-1].append((k, v))
    try:
        head = dict(sections[0])
        private_key = bytes.fromhex(head.get("private_key", ""))
        port = int(head.get("listen_port", "0"))
        peers = [_peer(s) for s in sections[1:]]
    except ValueError as e:
        raise UapiError(-1, f"unreadable answer: {e}") from None
    handshakes = {p.public_key: h for p, h in peers}
    return Device(private_key, port, tuple(sorted(p for p, _ in peers)), handshakes)


def _peer(section: list[tuple[str, str]]) -> tuple[Peer, int]:
    one = dict(section)
    allowed = tuple(sorted(v for k, v in section if k == "allowed_ip"))
    peer = Peer(
        bytes.fromhex(one["public_key"]),
        one.get("endpoint", ""),
        allowed,
        int(one.get("persistent_keepalive_interval", "0")),
    )
    return peer, int(one.get("last_handshake_time_sec", "0"))


def _pairs(answer: bytes) -> list[tuple[str, str]]:
    try:
        text = answer.decode("ascii")
    except UnicodeDecodeError:
        raise UapiError(-1, "answer is not ASCII") from None
    out = []
    for line in text.split("\n"):
        if not line:
            continue
        k, sep, v = line.partition("=")
        if not sep:
            raise UapiError(-1, f"unreadable line {line[:80]!r}")
        out.append((k, v))
    return out


def _errno(pairs: list[tuple[str, str]]) -> int:
    if not pairs or pairs[-1][0] != "errno":
        raise UapiError(-1, "answer has no errno")
    try:
        return int(pairs[-1][1])
    except ValueError:
        raise UapiError(-1, f"bad errno {pairs[-1][1][:20]!r}") from None
