"""The group commit with a sync of its own: the next batch runs while the last one
is being made durable; answers come in commit order, each after its own sync; a
failed sync is final."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from segd.errors import Unavailable
from segd.server.changes import Change, WorkloadRemoved
from segd.server.commit import GroupCommit


class Sealer:
    """Numbers what it seals and records what it hears."""

    def __init__(self) -> None:
        self.sealed = 0
        self.heard: list[tuple[str, int | None]] = []

    def seal(self, changes: list[Change]) -> int:
        self.sealed += 1
        return self.sealed

    def committed(self, sealed: int) -> None:
        self.heard.append(("committed", sealed))

    def aborted(self, sealed: int | None) -> None:
        self.heard.append(("aborted", sealed))


class Sync:
    """A sync that waits until the test lets it go (one `release` per sync)."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.go = threading.Semaphore(0)
        self.fail = False
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        self.started.release()
        if not self.go.acquire(timeout=10):
            raise TimeoutError("the test never released the sync")
        if self.fail:
            raise OSError(5, "Input/output error")


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = sqlite3.connect(tmp_path / "t.db", isolation_level=None, check_same_thread=False)
    c.execute("PRAGMA journal_mode = WAL")
    c.execute("CREATE TABLE t (n INTEGER)")
    yield c
    c.close()


async def _write(
    gc: GroupCommit[int], conn: sqlite3.Connection, n: int, ran: asyncio.Event | None = None
) -> None:
    async with gc.write() as changes:
        conn.execute("INSERT INTO t VALUES (?)", (n,))
        changes.append(WorkloadRemoved(f"w{n}"))
        if ran is not None:
            ran.set()


async def _sync_started(sync: Sync) -> None:
    assert await asyncio.to_thread(sync.started.acquire, True, 10)


async def test_the_next_batch_runs_while_the_last_is_synced_and_answers_keep_commit_order(
    conn: sqlite3.Connection,
) -> None:
    sealer, sync = Sealer(), Sync()
    gc = GroupCommit(conn, sealer, sync)
    first = asyncio.create_task(_write(gc, conn, 1))
    await _sync_started(sync)  # batch 1 committed, its sync held
    ran = asyncio.Event()
    second = asyncio.create_task(_write(gc, conn, 2, ran))
    await asyncio.wait_for(ran.wait(), 10)  # batch 2's body ran meanwhile
    assert not first.done() and not second.done() and sealer.heard == []
    sync.go.release()  # batch 1 durable
    await first
    assert sealer.heard == [("committed", 1)]
    await _sync_started(sync)  # then batch 2 committed; its sync held
    assert not second.done()
    sync.go.release()
    await second
    assert sealer.heard == [("committed", 1), ("committed", 2)]
    await gc.close()


async def test_a_failed_sync_fails_its_batch_every_later_one_and_every_new_writer(
    conn: sqlite3.Connection,
) -> None:
    sealer, sync = Sealer(), Sync()
    gc = GroupCommit(conn, sealer, sync)
    first = asyncio.create_task(_write(gc, conn, 1))
    await _sync_started(sync)
    ran = asyncio.Event()
    second = asyncio.create_task(_write(gc, conn, 2, ran))
    await asyncio.wait_for(ran.wait(), 10)
    sync.fail = True
    sync.go.release()
    with pytest.raises(Unavailable, match="could not be synced"):
        await first
    await _sync_started(sync)
    sync.fail = False
    sync.go.release()  # batch 2's own sync succeeds, but it stands on batch 1
    with pytest.raises(Unavailable, match="could not be synced"):
        await second
    with pytest.raises(Unavailable, match="restart segd"):
        await _write(gc, conn, 3)
    assert sealer.heard == [("aborted", 1), ("aborted", 2)]
    assert conn.execute("SELECT count(*) FROM t WHERE n = 3").fetchone()[0] == 0
    await gc.close()


async def test_without_a_sync_the_next_batch_waits_for_the_commit(
    conn: sqlite3.Connection,
) -> None:
    sealer = Sealer()
    gc: GroupCommit[int] = GroupCommit(conn, sealer)
    await asyncio.gather(*(_write(gc, conn, n) for n in range(20)))
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 20
    assert [h for h, _ in sealer.heard] == ["committed"] * len(sealer.heard)
    assert [s for _, s in sealer.heard] == list(range(1, len(sealer.heard) + 1))
    await gc.close()
