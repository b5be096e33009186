"""A ctnetlink counter: one namespace's connections, with their packets and bytes.

Made like an NFLOG reader (`_nflog`): on the netns worker inside the
container's namespace (`Worker.made_in`), since a netlink socket and a
`/proc/sys/net` file both belong to the namespace of whoever opened them.
Making one turns on `net.netfilter.nf_conntrack_acct` there (counters exist
only for connections tracked after that) and opens two sockets:

- `events`: subscribed to the destroy group, read on the event loop
  (`drain`). The kernel makes events only for connections that began while a
  listener existed in the namespace (`nf_conntrack_events=2`), so it is opened
  right after the table is applied. Its receive buffer is 4 MiB; an overrun
  (ENOBUFS) is counted in `lost`, never hidden.
- `dumps`: asks for every entry of the namespace (`dump`), for the counters
  of connections still open: blocking, with a timeout, to be run off the loop.

Messages are built and read by the pure `segd.firewall.conntrack`.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

from segd.firewall import conntrack
from segd.firewall.conntrack import CtEntry
from segd.firewall.kernel._netlink import RECV_SIZE, big_buffer, netfilter_socket, queued

ACCT = "/proc/sys/net/netfilter/nf_conntrack_acct"


class ConntrackError(OSError):
    pass


def enable_accounting(path: str = ACCT) -> None:
    """Count packets and bytes of the connections tracked from now on, in the
    namespace of the calling thread."""
    try:
        with open(path, "w") as f:
            f.write("1")
    except FileNotFoundError:
        raise ConntrackError(
            errno.ENOENT, f"no {path}: conntrack is not in this kernel (modprobe nf_conntrack)"
        ) from None


class ConnCounter:
    """Destroy events and dumps of the conntrack table of the namespace it was made in."""

    def __init__(self, timeout: float = 1.0) -> None:
        self.lost = 0  # overruns: the kernel dropped destroy events for this socket
        self.window = 0.0  # when the current second of reading began (monotonic)
        self.taken = 0  # ended connections read in it
        self.timeout = timeout
        self._seq = 0
        self._dumping = threading.Lock()  # one dump at a time
        self._state = threading.Lock()  # guards `_busy` and `_closed`
        self._busy = self._closed = False
        enable_accounting()
        self.events = netfilter_socket()
        try:
            self.dumps = netfilter_socket()
        except BaseException:
            self.events.close()
            raise
        try:
            self._setup()
        except BaseException:
            self.events.close()
            self.dumps.close()
            raise

    def _setup(self) -> None:
        big_buffer(self.events)
        self.events.bind((0, 1 << (conntrack.DESTROY_GROUP - 1)))
        self.events.setblocking(False)
        self.dumps.bind((0, 0))
        self.dumps.settimeout(self.timeout)
        try:
            self._ask(conntrack.stats_request)
        except ConntrackError as e:
            raise ConntrackError(
                e.errno, f"ctnetlink (nf_conntrack_netlink) is not available: {e.strerror}"
            ) from None

    def fileno(self) -> int:
        return self.events.fileno()

    def drain(self, most: int = 16) -> list[CtEntry]:
        """Connections that ended, queued now (at most `most` datagrams); never blocks."""
        datagrams, overruns = queued(self.events, most)
        self.lost += overruns
        return [e for data in datagrams for e in conntrack.parse(data) if e.ended]

    def dump(self) -> list[CtEntry]:
        """Every connection tracked now, with its running counters. Blocks (each
        read for at most `timeout`): run it off the event loop."""
        with self._dumping:
            with self._state:
                if self._closed:
                    raise ConntrackError(errno.EBADF, "conntrack counter is closed")
                self._busy = True
            try:
                return self._ask(conntrack.dump_request)
            finally:
                with self._state:
                    self._busy = False
                    if self._closed:
                        self.dumps.close()

    def _ask(self, build: Callable[[int], bytes]) -> list[CtEntry]:
        """Send one request on `dumps` and read its whole reply."""
        self._seq += 1
        seq = self._seq
        self.dumps.send(build(seq))
        found: list[CtEntry] = []
        while True:
            try:
                data = self.dumps.recv(RECV_SIZE)
            except TimeoutError:
                raise ConntrackError(errno.ETIMEDOUT, "ctnetlink did not answer") from None
            entries, end = conntrack.read_dump(data, seq)
            found += entries
            if end == 0:
                return found
            if end is not None:
                name = errno.errorcode.get(end, str(end))
                raise ConntrackError(end, f"ctnetlink: {name}")

    def close(self) -> None:
        """Close both sockets; a dump under way closes its own when it ends."""
        self.events.close()
        with self._state:
            self._closed = True
            if not self._busy:
                self.dumps.close()
