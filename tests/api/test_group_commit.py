"""Group commit: writers share transactions, and each is answered only once its own
transaction is durable; a failed writer or commit leaves nothing behind, and the
change records of a commit reach its follower only once it is durable."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from segd.errors import SegdError
from segd.server.changes import Commit, HostAdded
from segd.server.store import Store, Tx

FAIL_GENERATION = """
CREATE TRIGGER fail_generation BEFORE UPDATE ON generation
BEGIN SELECT RAISE(ABORT, 'disk I/O error (injected)'); END;
"""


def add_host(tx: Tx, name: str) -> None:
    tx.insert_host(name, name, f"key-{name}", 0.0)


def committed_hosts(store: Store) -> set[str]:
    db = sqlite3.connect(store.path)
    try:
        return {r[0] for r in db.execute("SELECT id FROM hosts")}
    finally:
        db.close()


def sql(store: Store, script: str) -> None:
    db = sqlite3.connect(store.path)
    try:
        db.executescript(script)
    finally:
        db.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "segd.db")
    try:
        yield s
    finally:
        await s.close()


def committed_tokens(store: Store) -> set[str]:
    """What another connection sees: committed rows only."""
    db = sqlite3.connect(store.path)
    try:
        return {r[0] for r in db.execute("SELECT token_hash FROM admin_tokens")}
    finally:
        db.close()


async def test_concurrent_writers_share_commits_and_return_only_when_durable(
    store: Store,
) -> None:
    async def writer(i: int) -> None:
        async with store.write() as tx:
            tx.insert_admin_token(f"t{i}", 0.0)
        assert f"t{i}" in committed_tokens(store)  # durable before the writer returns

    await asyncio.gather(*(writer(i) for i in range(60)))
    assert committed_tokens(store) == {f"t{i}" for i in range(60)}
    assert 1 <= store.commits < 60


async def test_changes_reach_the_follower_once_durable_in_commit_order(store: Store) -> None:
    """One commit per batch, its records in the order its writers wrote them, and a
    generation one more than the last commit with changes; a commit without
    changes (audit only) takes none."""
    seen: list[Commit] = []

    def follow(commit: Commit) -> None:
        assert {c.host_id for c in commit.changes if isinstance(c, HostAdded)} <= (
            committed_hosts(store)
        )  # durable before it is followed
        seen.append(commit)

    store.follow(follow)

    async def writer(i: int) -> None:
        async with store.write() as tx:
            if i % 3:
                add_host(tx, f"h{i:02d}")
            else:
                tx.insert_admin_token(f"t{i}", 0.0)
        # the writer is answered after its commit was followed
        assert i % 3 == 0 or any(
            c == HostAdded(f"h{i:02d}", f"key-h{i:02d}") for cm in seen for c in cm.changes
        )

    await asyncio.gather(*(writer(i) for i in range(30)))
    assert [cm.generation for cm in seen] == list(range(1, len(seen) + 1))
    assert 1 <= len(seen) < 20 and store.generation == len(seen)
    names = [c.host_id for cm in seen for c in cm.changes if isinstance(c, HostAdded)]
    assert names == sorted(names)  # writers of a batch write in the order they came
    assert set(names) == {f"h{i:02d}" for i in range(30) if i % 3}


async def test_a_failing_writer_is_rolled_back_alone(store: Store) -> None:
    seen: list[Commit] = []
    store.follow(seen.append)

    async def writer(i: int) -> None:
        async with store.write() as tx:
            add_host(tx, f"h{i}")
            if i == 3:
                raise ValueError("refused")

    results = await asyncio.gather(*(writer(i) for i in range(8)), return_exceptions=True)
    assert [type(r) for r in results].count(ValueError) == 1
    assert committed_hosts(store) == {f"h{i}" for i in range(8) if i != 3}
    followed = {c.host_id for cm in seen for c in cm.changes if isinstance(c, HostAdded)}
    assert followed == {f"h{i}" for i in range(8) if i != 3}  # its record went with it


async def test_a_failed_commit_fails_every_writer_and_follows_nothing(store: Store) -> None:
    seen: list[Commit] = []
    store.follow(seen.append)
    async with store.write() as tx:  # something committed before
        add_host(tx, "before")
    started = asyncio.Event()

    async def writer(i: int) -> None:
        async with store.write() as tx:
            add_host(tx, f"h{i}")
        started.set()

    sql(store, FAIL_GENERATION)
    results = await asyncio.gather(*(writer(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, SegdError) and "injected" in r.message for r in results), results
    assert not started.is_set()
    assert committed_hosts(store) == {"before"}
    assert [cm.generation for cm in seen] == [1] and store.generation == 1
    # The store goes on: the next writer commits, at the next generation.
    sql(store, "DROP TRIGGER fail_generation;")
    async with store.write() as tx:
        add_host(tx, "after")
    assert committed_hosts(store) == {"before", "after"}
    assert [cm.generation for cm in seen] == [1, 2]
    assert seen[1].changes == [HostAdded("after", "key-after")]


async def test_constraint_failure_in_one_writer_keeps_the_batch(store: Store) -> None:
    async def writer(token: str) -> None:
        async with store.write() as tx:
            tx.insert_admin_token(token, 0.0)
            if token == "dup":
                tx.insert_admin_token(token, 0.0)  # ignored (INSERT OR IGNORE)
                tx.insert_activation_code("c", 0.0, 1.0)
                tx.insert_activation_code("c", 0.0, 1.0)  # primary key: Conflict

    results = await asyncio.gather(writer("a"), writer("dup"), writer("b"), return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["NoneType", "Conflict", "NoneType"]
    assert committed_tokens(store) == {"a", "b"}


async def test_close_waits_for_writers_in_flight(tmp_path: Path) -> None:
    s = await Store.open(tmp_path / "segd.db")

    async def writer(i: int) -> None:
        async with s.write() as tx:
            tx.insert_admin_token(f"t{i}", 0.0)

    tasks = [asyncio.create_task(writer(i)) for i in range(10)]
    await asyncio.sleep(0)  # every writer is in, waiting for the commit
    await s.close()
    assert all(t.done() and t.exception() is None for t in tasks)
    db = sqlite3.connect(tmp_path / "segd.db")
    try:
        assert db.execute("SELECT count(*) FROM admin_tokens").fetchone()[0] == 10
    finally:
        db.close()


async def test_a_statement_that_rolls_back_the_transaction_fails_its_whole_batch(
    store: Store,
) -> None:
    """SQLite may roll back the whole transaction on an error (a full disk does):
    then the writers before it lost their statements too, and must not succeed."""
    db = sqlite3.connect(store.path)
    db.executescript(
        "CREATE TRIGGER poison BEFORE INSERT ON admin_tokens WHEN NEW.token_hash = 'poison'"
        " BEGIN SELECT RAISE(ROLLBACK, 'injected rollback'); END;"
    )
    db.close()
    seen: list[Commit] = []
    store.follow(seen.append)

    async def writer(token: str) -> None:
        async with store.write() as tx:
            add_host(tx, token)
            tx.insert_admin_token(token, 0.0)

    tokens = ["a", "b", "poison", "c", "d"]
    results = await asyncio.gather(*(writer(t) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, SegdError) for r in results), results
    assert committed_tokens(store) == set() and committed_hosts(store) == set()
    assert seen == []  # a and b wrote before poison, and lost their records with it
    async with store.write() as tx:
        tx.insert_admin_token("after", 0.0)
    assert committed_tokens(store) == {"after"}
