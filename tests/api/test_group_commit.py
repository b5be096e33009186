"""Group commit: writers share transactions, and each is answered only once its own
transaction is durable; a failed writer or commit leaves nothing behind."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from segd.errors import SegdError, Unavailable
from segd.server.store import Store, Tx


class Hooks:
    """Counts commits; can be told to fail the next one."""

    def __init__(self) -> None:
        self.commits = 0
        self.aborts = 0
        self.fail_next = False

    def before_commit(self, tx: Tx) -> None:
        if self.fail_next:
            self.fail_next = False
            raise sqlite3.OperationalError("disk I/O error (injected)")

    def after_commit(self) -> None:
        self.commits += 1

    def after_abort(self) -> None:
        self.aborts += 1


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
    hooks = Hooks()
    store.hooks = hooks

    async def writer(i: int) -> None:
        async with store.write() as tx:
            tx.insert_admin_token(f"t{i}", 0.0)
        assert f"t{i}" in committed_tokens(store)  # durable before the writer returns

    await asyncio.gather(*(writer(i) for i in range(60)))
    assert committed_tokens(store) == {f"t{i}" for i in range(60)}
    assert 1 <= hooks.commits < 60 and hooks.aborts == 0


async def test_a_failing_writer_is_rolled_back_alone(store: Store) -> None:
    undone: list[str] = []

    async def writer(i: int) -> None:
        async with store.write() as tx:
            tx.insert_admin_token(f"t{i}", 0.0)
            tx.on_undo(lambda: undone.append(f"t{i}"))
            if i == 3:
                raise ValueError("refused")

    results = await asyncio.gather(*(writer(i) for i in range(8)), return_exceptions=True)
    assert [type(r) for r in results].count(ValueError) == 1
    assert committed_tokens(store) == {f"t{i}" for i in range(8) if i != 3}
    assert undone == ["t3"]


async def test_a_failed_commit_fails_every_writer_and_undoes_newest_first(store: Store) -> None:
    hooks = Hooks()
    store.hooks = hooks
    async with store.write() as tx:  # something committed before
        tx.insert_admin_token("before", 0.0)
    undone: list[int] = []
    started = asyncio.Event()

    async def writer(i: int) -> None:
        async with store.write() as tx:
            tx.insert_admin_token(f"t{i}", 0.0)
            tx.on_undo(lambda: undone.append(i))
        started.set()

    hooks.fail_next = True
    results = await asyncio.gather(*(writer(i) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results), results
    assert not started.is_set()
    assert committed_tokens(store) == {"before"}
    assert undone == sorted(undone, reverse=True) and len(undone) == 5
    assert hooks.aborts == 1
    # The store goes on: the next writer commits.
    async with store.write() as tx:
        tx.insert_admin_token("after", 0.0)
    assert committed_tokens(store) == {"before", "after"}


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
    undone: list[str] = []

    async def writer(token: str) -> None:
        async with store.write() as tx:
            tx.insert_admin_token(token, 0.0)
            tx.on_undo(lambda: undone.append(token))

    tokens = ["a", "b", "poison", "c", "d"]
    results = await asyncio.gather(*(writer(t) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, SegdError) for r in results), results
    assert committed_tokens(store) == set()
    assert sorted(undone) == ["a", "b"]  # poison failed first; c and d never ran
    async with store.write() as tx:
        tx.insert_admin_token("after", 0.0)
    assert committed_tokens(store) == {"after"}
