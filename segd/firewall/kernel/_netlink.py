"""What the netfilter netlink readers (`_nflog`, `_conntrack`) share: a socket
with a large receive buffer, and reading what is queued without blocking."""

from __future__ import annotations

import errno
import socket

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33
RCVBUF = 4 * 1024 * 1024  # 50,000 NFLOG packets at ~98k/s arrived without an overrun
RECV_SIZE = 1 << 17


def netfilter_socket() -> socket.socket:
    """A NETLINK_NETFILTER socket in the caller's namespace, not bound yet."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)


def big_buffer(sock: socket.socket) -> None:
    """A 4 MiB receive buffer (above the system's limit when the process may)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)


def queued(sock: socket.socket, most: int) -> tuple[list[bytes], int]:
    """The datagrams queued now (at most `most`) on a non-blocking socket, and
    how many overruns (ENOBUFS: the kernel dropped messages for it) were met."""
    out: list[bytes] = []
    overruns = 0
    for _ in range(most):
        try:
            out.append(sock.recv(RECV_SIZE))
        except BlockingIOError:
            break
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            overruns += 1
    return out, overruns
