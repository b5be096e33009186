"""Group commit: many writers share one SQLite transaction and one fsync.

A writer joins the open transaction (or, while one is being committed, the
next one), runs its body inside its own SAVEPOINT, and returns only once the
whole transaction is durable: a change is acknowledged after its commit, never
before. A body that raises is rolled back to its savepoint, and the change
records it made go with it; the rest of the batch goes on. A commit that fails
fails every writer of the batch.

Statements run on the event loop's thread: they touch SQLite's page cache and
take microseconds. Only COMMIT, which waits for the disk, runs on a worker
thread, and nobody uses the connection meanwhile; writers that arrive during a
commit form the next batch. So the batch grows with the load and a lone writer
waits for one fsync, as it would without batching.

The owner (the store) adds the transaction's last statements when it is sealed
(`Sealer.seal`, given the change records of every writer, in order) and hears
whether it became durable (`committed`, before any writer is answered, so what
they read next includes it) or not (`aborted`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from segd import log
from segd.errors import Conflict, SegdError, Unavailable
from segd.server.changes import Change, Commit

_log = log.get("segd.server.store")

T = TypeVar("T")


def map_error(e: sqlite3.Error) -> SegdError:
    if isinstance(e, sqlite3.IntegrityError):
        return Conflict(f"conflicting change: {e}")
    return Unavailable(f"store unavailable: {e}")


class Sealer(Protocol):
    def seal(self, changes: list[Change]) -> Commit | None:
        """The transaction's last statements (on the event loop, before COMMIT)."""
        ...

    def committed(self, commit: Commit | None) -> None:
        """The sealed transaction is durable."""
        ...

    def aborted(self) -> None:
        """The sealed (or sealing) transaction was rolled back."""
        ...


class _Batch:
    def __init__(self) -> None:
        self.changes: list[Change] = []  # of the writers whose bodies completed, in order
        self.waiting: list[asyncio.Future[None]] = []  # their answers, one each
        self.active = 0  # writers inside their body
        self.failed: SegdError | None = None  # the transaction is lost

    def finish(self, err: BaseException | None) -> None:
        """Answer every waiting writer (in the order they came)."""
        for fut in self.waiting:
            if fut.done():  # that writer was cancelled
                continue
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(err)


class GroupCommit:
    """Serialised writers on one connection (opened with isolation_level=None)."""

    def __init__(self, conn: sqlite3.Connection, sealer: Sealer) -> None:
        self._conn = conn
        self._sealer = sealer
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="segd-commit")
        self._open: _Batch | None = None  # the transaction writers may join
        self._committing: asyncio.Future[None] | None = None  # COMMIT on the worker thread
        self._idle: asyncio.Future[None] | None = None  # set when that commit ends
        self._body = asyncio.Lock()
        self.commits = 0  # durable transactions so far

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[list[Change]]:
        """One writer: yields the list its change records go to."""
        batch = await self._join()
        changes: list[Change] = []
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            async with self._body:
                if batch.failed is not None:
                    raise batch.failed
                self._exec("SAVEPOINT w")
                try:
                    yield changes
                except BaseException as e:
                    self._roll_back_body(batch)
                    if isinstance(e, sqlite3.Error):
                        raise map_error(e) from None
                    raise
                self._exec("RELEASE w")
                batch.changes += changes
                batch.waiting.append(answer)
        except sqlite3.Error as e:  # SAVEPOINT or RELEASE: count the transaction lost
            batch.failed = batch.failed or map_error(e)
            raise batch.failed from None
        finally:
            self._leave(batch)
        await answer

    async def when_idle(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the connection once no transaction is open or committing."""
        while True:
            if self._committing is None and self._open is not None and self._open.active == 0:
                self._start_commit(self._open)
            if self._open is None and self._committing is None:
                return fn(self._conn)
            await self._wait_idle()

    async def close(self) -> None:
        """Let the open transaction and the commit in flight finish; stop the thread."""
        await self.when_idle(lambda _: None)
        self._thread.shutdown(wait=True)

    # ---- batches ------------------------------------------------------------------

    async def _join(self) -> _Batch:
        while True:
            if self._open is not None:
                self._open.active += 1
                return self._open
            if self._committing is None:
                self._exec_mapped("BEGIN IMMEDIATE")
                self._open = _Batch()
                continue
            await self._wait_idle()

    async def _wait_idle(self) -> None:
        if self._idle is None:
            self._idle = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._idle)

    def _leave(self, batch: _Batch) -> None:
        batch.active -= 1
        if batch.active == 0:
            # Let writers already woken for this batch join it before it commits.
            asyncio.get_running_loop().call_soon(self._maybe_commit, batch)

    def _maybe_commit(self, batch: _Batch) -> None:
        if batch is self._open and batch.active == 0 and self._committing is None:
            self._start_commit(batch)

    def _start_commit(self, batch: _Batch) -> None:
        """Seal the batch, then COMMIT on the worker thread; the outcome is handled
        by a callback, so no cancellation can come between."""
        self._open = None
        try:
            if batch.failed is not None:
                raise batch.failed
            if not batch.waiting:
                self._conn.execute("ROLLBACK")  # nothing of it was kept
                self._set_idle()
                return
            commit = self._sealer.seal(batch.changes)
        except BaseException as e:
            self._abort(batch, e)
            self._set_idle()
            if not isinstance(e, Exception):
                raise
            return
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._thread, self._commit_now)
        self._committing = fut
        fut.add_done_callback(lambda f: self._committed(batch, commit, f))

    def _commit_now(self) -> None:
        """On the worker thread: COMMIT, waiting for the disk."""
        self._conn.execute("COMMIT")

    def _committed(self, batch: _Batch, commit: Commit | None, fut: asyncio.Future[None]) -> None:
        self._committing = None
        err = fut.exception()
        if err is None:
            self.commits += 1
            try:
                self._sealer.committed(commit)
            except Exception:  # committed all the same: the writers must hear so
                _log.exception("store.after_commit_failed")
            batch.finish(None)
        else:
            self._abort(batch, err)
        # The writers answered first run first: they read what this commit
        # published before the next transaction's writers change anything.
        self._set_idle()

    def _abort(self, batch: _Batch, e: BaseException) -> None:
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
        self._sealer.aborted()
        err = map_error(e) if isinstance(e, sqlite3.Error) else e
        if isinstance(err, SegdError):
            _log.warning("store.commit_failed", error=err.message, writers=len(batch.waiting))
        batch.finish(err)

    def _set_idle(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.set_result(None)

    # ---- statements ---------------------------------------------------------------

    def _exec(self, sql: str) -> None:
        self._conn.execute(sql)

    def _exec_mapped(self, sql: str) -> None:
        try:
            self._conn.execute(sql)
        except sqlite3.Error as e:
            raise map_error(e) from None

    def _roll_back_body(self, batch: _Batch) -> None:
        """Undo one body's statements; when SQLite already rolled back the whole
        transaction (as it may on a full disk), the batch is lost."""
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK TO w")
                self._conn.execute("RELEASE w")
                return
            err: SegdError = Unavailable("store unavailable: the transaction was rolled back")
        except sqlite3.Error as e:
            err = map_error(e)
        batch.failed = batch.failed or err
