"""The per-namespace sources the kernel module reads on the loop: one per key,
read when readable, within a budget a second, closed on a read failure."""

from __future__ import annotations

import asyncio
import socket

from segd.firewall.kernel._watched import Watched
from segd.firewall.kernel._worker import NsId

NS: NsId = (1, 1)
NS2: NsId = (1, 2)


class Src:
    """A source on one end of a socket pair: each byte written is one item."""

    def __init__(self, fail: bool = False) -> None:
        self.mine, self.peer = socket.socketpair()
        self.mine.setblocking(False)
        self.lost = 0
        self.window = 0.0
        self.taken = 0
        self.closed = False
        self.fail = fail

    def fileno(self) -> int:
        return self.mine.fileno()

    def drain(self) -> list[int]:
        if self.fail:
            raise OSError("read failed")
        try:
            return list(self.mine.recv(4096))
        except BlockingIOError:
            return []

    def close(self) -> None:
        self.closed = True
        self.mine.close()
        self.peer.close()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


async def test_what_a_source_reads_is_delivered_with_its_key() -> None:
    got: list[tuple[str, list[int], int]] = []
    w: Watched[Src, int] = Watched(
        "log", lambda: 100, lambda k, xs, lost: got.append((k, xs, lost))
    )
    src = Src()
    w.watch("a", NS, src)
    src.peer.send(b"\x01\x02")
    await settle()
    assert got == [("a", [1, 2], 0)]
    assert w.has("a", NS) and not w.has("a", NS2) and len(w) == 1
    w.close_all()
    assert src.closed and len(w) == 0


async def test_a_second_source_for_a_key_closes_the_first() -> None:
    w: Watched[Src, int] = Watched("log", lambda: 100, None)
    first, second = Src(), Src()
    w.watch("a", NS, first)
    w.watch("a", NS2, second)
    assert first.closed and not second.closed
    assert w.current("a", second) and not w.current("a", first)
    w.close_all()


async def test_past_the_budget_a_source_is_not_read_for_the_rest_of_the_second() -> None:
    got: list[int] = []
    w: Watched[Src, int] = Watched("count", lambda: 3, lambda k, xs, lost: got.extend(xs))
    src = Src()
    w.watch("a", NS, src)
    src.peer.send(b"\x01\x02\x03")
    await settle()
    src.peer.send(b"\x04")
    await settle()
    assert got == [1, 2, 3]  # paused: the fourth waits for the next second
    await asyncio.sleep(1.1)
    assert got == [1, 2, 3, 4]
    w.close_all()


async def test_a_source_that_fails_to_read_is_closed() -> None:
    w: Watched[Src, int] = Watched("log", lambda: 100, None)
    src = Src(fail=True)
    w.watch("a", NS, src)
    src.peer.send(b"\x01")
    await settle()
    assert src.closed and len(w) == 0
