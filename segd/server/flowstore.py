"""The flow store: the flows agents report, in a SQLite file of its own (flows.db).

Apart from the server's store (`store.py`) so that reports never hold up a
pairing: its own file, connection and thread, and `synchronous = NORMAL` (a
flow lost in a power cut is a report lost, not a decision). One batch is one
transaction; a batch its agent names is kept once, however often it is sent
(the names are forgotten after a day). All of its SQL lives here.

Queries go newest first by (`last_seen`, `id`), a page's cursor being the last
row's pair; the indexes serve the time window, either end's workload and the
verdict. Old rows are summed per hour (`rollup`) and, past retention, deleted,
in bounded transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from segd import sqlite, wire
from segd.errors import InvalidInput, Unavailable
from segd.policy import Labels
from segd.server.flowquery import FlowFilter

T = TypeVar("T")

HOUR_S = 3600.0
PRUNE_BATCH = 5000

MIGRATIONS: list[str] = [
    # 1: flows, and per host the records its agent said it lost and those refused.
    """
    CREATE TABLE flows (
        id            INTEGER PRIMARY KEY,
        reported_by   TEXT NOT NULL,
        src_ip        TEXT NOT NULL,
        src_kind      TEXT NOT NULL,
        src_workload  TEXT NOT NULL,
        src_labels    TEXT NOT NULL,
        src_host      TEXT NOT NULL,
        src_container TEXT NOT NULL,
        dst_ip        TEXT NOT NULL,
        dst_kind      TEXT NOT NULL,
        dst_workload  TEXT NOT NULL,
        dst_labels    TEXT NOT NULL,
        dst_host      TEXT NOT NULL,
        dst_container TEXT NOT NULL,
        proto         TEXT NOT NULL,
        port          INTEGER NOT NULL,
        verdict       TEXT NOT NULL,
        rule_id       TEXT NOT NULL,
        connections   INTEGER NOT NULL,
        packets       INTEGER NOT NULL,
        bytes         INTEGER NOT NULL,
        first_seen    REAL NOT NULL,
        last_seen     REAL NOT NULL,
        rolled_up     INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX flows_time ON flows(last_seen, id);
    CREATE INDEX flows_src_workload ON flows(src_workload, last_seen);
    CREATE INDEX flows_dst_workload ON flows(dst_workload, last_seen);
    CREATE INDEX flows_verdict ON flows(verdict, last_seen);
    CREATE INDEX flows_rollup ON flows(rolled_up, last_seen);

    CREATE TABLE flow_losses (
        host_id  TEXT PRIMARY KEY,
        lost     INTEGER NOT NULL DEFAULT 0,
        refused  INTEGER NOT NULL DEFAULT 0
    );
    """,
    # 2: the batches kept, by the agent's name for each, so that a batch sent
    # again (its agent did not hear the answer) is not kept twice.
    """
    CREATE TABLE flow_batches (
        host_id  TEXT NOT NULL,
        batch_id TEXT NOT NULL,
        at       REAL NOT NULL,
        PRIMARY KEY (host_id, batch_id)
    ) WITHOUT ROWID;
    CREATE INDEX flow_batches_at ON flow_batches(at);
    """,
]

_enc = msgspec.json.Encoder(order="deterministic")
_labels = msgspec.json.Decoder(Labels)

_COLUMNS = (
    "reported_by, src_ip, src_kind, src_workload, src_labels, src_host, src_container,"
    " dst_ip, dst_kind, dst_workload, dst_labels, dst_host, dst_container, proto, port,"
    " verdict, rule_id, connections, packets, bytes, first_seen, last_seen"
)
_INSERT_ID = f"INSERT INTO flows (id, {_COLUMNS}) VALUES ({', '.join('?' * 23)})"  # noqa: S608
# The columns that name a row for the hourly rollup (all but the counts and times).
_KEY = (
    "reported_by, src_ip, src_kind, src_workload, src_labels, src_host, src_container,"
    " dst_ip, dst_kind, dst_workload, dst_labels, dst_host, dst_container, proto, port,"
    " verdict, rule_id"
)


# A rollup's sums of the counts: exact up to `wire.MAX_COUNT` and held there
# (`sum` would fail the whole rollup on an integer overflow).
_ROLLED_COUNTS = ", ".join(
    f"CAST(min(total({c}), {wire.MAX_COUNT}) AS INTEGER)"
    for c in ("connections", "packets", "bytes")
)


def _end_row(e: wire.FlowEnd, labels: dict[int, str]) -> tuple[str, ...]:
    text = labels.get(id(e.labels))
    if text is None:
        text = labels[id(e.labels)] = _enc.encode(e.labels).decode()
    return (e.ip, e.kind, e.workload_id, text, e.host_id, e.container_id)


def _row(f: wire.Flow, labels: dict[int, str]) -> tuple[Any, ...]:
    """A flow's columns; `labels` caches label sets' JSON by object (for one batch,
    while the flows hold them)."""
    return (
        f.reported_by,
        *_end_row(f.src, labels),
        *_end_row(f.dst, labels),
        f.proto,
        f.port,
        f.verdict,
        f.rule_id,
        f.connections,
        f.packets,
        f.bytes,
        f.first_seen,
        f.last_seen,
    )


def _end(r: sqlite3.Row, side: str) -> wire.FlowEnd:
    return wire.FlowEnd(
        ip=r[f"{side}_ip"],
        kind=r[f"{side}_kind"],
        workload_id=r[f"{side}_workload"],
        labels=_labels.decode(r[f"{side}_labels"]),
        host_id=r[f"{side}_host"],
        container_id=r[f"{side}_container"],
    )


def _flow(r: sqlite3.Row) -> wire.Flow:
    return wire.Flow(
        id=r["id"],
        src=_end(r, "src"),
        dst=_end(r, "dst"),
        proto=r["proto"],
        port=r["port"],
        verdict=r["verdict"],
        rule_id=r["rule_id"],
        connections=r["connections"],
        packets=r["packets"],
        bytes=r["bytes"],
        first_seen=r["first_seen"],
        last_seen=r["last_seen"],
        reported_by=r["reported_by"],
    )


def cursor_of(f: wire.Flow) -> str:
    """The cursor of the page after `f` (newest first)."""
    return f"{f.last_seen!r}_{f.id}"


def parse_cursor(text: str) -> tuple[float, int]:
    at, _, fid = text.partition("_")
    try:
        out = float(at), int(fid)
    except ValueError:
        raise InvalidInput(f"query parameter 'cursor': invalid cursor {text[:40]!r}") from None
    if not (math.isfinite(out[0]) and 0 <= out[1] < 2**63):
        raise InvalidInput(f"query parameter 'cursor': invalid cursor {text[:40]!r}")
    return out


def where(flt: FlowFilter, cursor: tuple[float, int] | None) -> tuple[str, list[Any]]:
    """The WHERE clause (constant text, values bound) of a filter and a cursor."""
    clauses: list[str] = []
    params: list[Any] = []
    if flt.since is not None:
        clauses.append("last_seen >= ?")
        params.append(flt.since)
    if flt.until is not None:
        clauses.append("last_seen <= ?")
        params.append(flt.until)
    for side, labels in (("src", flt.src), ("dst", flt.dst)):
        for k, v in sorted(labels.items()):
            clauses.append(f"json_extract({side}_labels, ?) = ?")
            params += [f'$."{k}"', v]
    if flt.workload:
        clauses.append("(src_workload = ? OR dst_workload = ?)")
        params += [flt.workload, flt.workload]
    if flt.port is not None:
        clauses.append("port = ?")
        params.append(flt.port)
    if flt.verdict:
        clauses.append("verdict = ?")
        params.append(flt.verdict)
    if flt.rule:
        clauses.append("rule_id = ?")
        params.append(flt.rule)
    if cursor is not None:
        # A row value: SQLite seeks to it in (last_seen, id) rather than scanning.
        clauses.append("(last_seen, id) < (?, ?)")
        params += [cursor[0], cursor[1]]
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


_NEWEST = " ORDER BY last_seen DESC, id DESC LIMIT ?"


def page_query(
    flt: FlowFilter, limit: int, cursor: tuple[float, int] | None
) -> tuple[str, list[Any]]:
    """The SELECT of a page (constant text, values bound). A workload at either
    end is two seeks, one per end's index, each newest first, merged: an OR of
    the two would read and sort every matching row for every page."""
    if not flt.workload:
        clause, params = where(flt, cursor)
        return f"SELECT * FROM flows{clause}{_NEWEST}", [*params, limit]  # noqa: S608
    clause, params = where(dataclasses.replace(flt, workload=""), cursor)
    rest = clause.replace(" WHERE ", " AND ", 1)
    src = f"SELECT * FROM flows WHERE src_workload = ?{rest}{_NEWEST}"  # noqa: S608
    dst = f"SELECT * FROM flows WHERE dst_workload = ? AND src_workload != ?{rest}{_NEWEST}"  # noqa: S608
    sql = f"SELECT * FROM ({src}) UNION ALL SELECT * FROM ({dst}){_NEWEST}"  # noqa: S608
    w = flt.workload
    return sql, [w, *params, limit, w, w, *params, limit, limit]


class FlowStore:
    """`await FlowStore.open(path)`, then `add`, `page`, `rollup`, `prune`, `close`."""

    def __init__(self, conn: sqlite3.Connection, thread: ThreadPoolExecutor) -> None:
        self._c = conn
        self._thread = thread

    @classmethod
    async def open(cls, path: Path) -> FlowStore:
        thread = ThreadPoolExecutor(1, thread_name_prefix="segd-flows")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(thread, _open, path)
        except BaseException as e:
            thread.shutdown(wait=False)
            if isinstance(e, sqlite3.Error):
                raise Unavailable(f"cannot open flow store {path}: {e}") from None
            raise
        return cls(conn, thread)

    async def close(self) -> None:
        with contextlib.suppress(Unavailable):
            await self._run(lambda c: c.close())
        self._thread.shutdown(wait=True)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, fn, self._c)
        except sqlite3.Error as e:
            raise Unavailable(f"flow store: {e}") from None

    async def add(
        self,
        host_id: str,
        flows: list[wire.Flow],
        lost: int,
        refused: int,
        *,
        batch_id: str = "",
        at: float = 0.0,
    ) -> list[wire.Flow] | None:
        """Store a batch's flows (one transaction) and count what the host lost and
        what was refused of it; the flows with their ids. A named batch the host
        sent before is not stored again: None."""

        def write(c: sqlite3.Connection) -> list[wire.Flow] | None:
            c.execute("BEGIN IMMEDIATE")
            try:
                if batch_id and not _first_time(c, host_id, batch_id, at):
                    c.execute("COMMIT")
                    return None  # kept before: nothing to encode
                labels: dict[int, str] = {}  # encoded once per label set object
                rows = [_row(f, labels) for f in flows]
                # The one writer, in its transaction: rowids follow the largest.
                first = int(c.execute("SELECT coalesce(max(id), 0) FROM flows").fetchone()[0]) + 1
                c.executemany(_INSERT_ID, [(first + i, *row) for i, row in enumerate(rows)])
                if lost or refused:
                    c.execute(
                        "INSERT INTO flow_losses (host_id, lost, refused) VALUES (?, ?, ?)"
                        " ON CONFLICT (host_id) DO UPDATE SET lost = min(lost + excluded.lost, ?),"
                        " refused = refused + excluded.refused",
                        (host_id, lost, refused, wire.MAX_COUNT),
                    )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            return [msgspec.structs.replace(f, id=first + i) for i, f in enumerate(flows)]

        return await self._run(write)

    async def page(
        self, flt: FlowFilter, limit: int, cursor: tuple[float, int] | None = None
    ) -> list[wire.Flow]:
        """Up to `limit` flows matching `flt`, newest first, after `cursor`."""
        sql, params = page_query(flt, limit, cursor)

        def read(c: sqlite3.Connection) -> list[wire.Flow]:
            return [_flow(r) for r in c.execute(sql, params)]

        return await self._run(read)

    async def losses(self) -> dict[str, tuple[int, int]]:
        """Per host: (records its agent lost, records refused)."""

        def read(c: sqlite3.Connection) -> dict[str, tuple[int, int]]:
            rows = c.execute("SELECT host_id, lost, refused FROM flow_losses")
            return {r["host_id"]: (r["lost"], r["refused"]) for r in rows}

        return await self._run(read)

    async def count(self) -> int:
        return await self._run(lambda c: int(c.execute("SELECT count(*) FROM flows").fetchone()[0]))

    async def rollup(self, cutoff: float) -> int:
        """Sum the flows last seen before `cutoff` (down to a whole hour, so that an
        hour is summed once, whole) into one row per hour and key, one hour per
        transaction; return how many rows were summed."""
        cutoff = (cutoff // HOUR_S) * HOUR_S
        total = 0
        while True:
            n = await self._run(lambda c: _rollup_hour(c, cutoff))
            if n < 0:
                return total
            total += n

    async def forget_batches(self, cutoff: float) -> int:
        """Forget the names of the batches kept before `cutoff`."""
        return await self._run(
            lambda c: c.execute("DELETE FROM flow_batches WHERE at < ?", (cutoff,)).rowcount
        )

    async def prune(self, cutoff: float) -> int:
        """Delete the flows last seen before `cutoff`, in bounded transactions."""
        total = 0
        while True:
            n = await self._run(
                lambda c: (
                    c.execute(
                        "DELETE FROM flows WHERE id IN (SELECT id FROM flows WHERE last_seen < ?"
                        " LIMIT ?)",
                        (cutoff, PRUNE_BATCH),
                    ).rowcount
                )
            )
            total += n
            if n < PRUNE_BATCH:
                return total


def _open(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA busy_timeout = 5000")
        sqlite.migrate(conn, MIGRATIONS)
    except BaseException:
        conn.close()
        raise
    return conn


def _first_time(c: sqlite3.Connection, host_id: str, batch_id: str, at: float) -> bool:
    """Note the batch as kept; False when it was kept before."""
    return bool(
        c.execute(
            "INSERT OR IGNORE INTO flow_batches (host_id, batch_id, at) VALUES (?, ?, ?)",
            (host_id, batch_id, at),
        ).rowcount
    )


def _rollup_hour(c: sqlite3.Connection, cutoff: float) -> int:
    """Sum the oldest hour not summed yet (before `cutoff`); -1 when none is left."""
    row = c.execute(
        "SELECT min(last_seen) FROM flows WHERE rolled_up = 0 AND last_seen < ?", (cutoff,)
    ).fetchone()
    if row is None or row[0] is None:
        return -1
    start = (row[0] // HOUR_S) * HOUR_S
    end = min(start + HOUR_S, cutoff)
    window = "rolled_up = 0 AND last_seen >= ? AND last_seen < ?"
    c.execute("BEGIN IMMEDIATE")
    try:
        c.execute(
            f"INSERT INTO flows ({_COLUMNS}, rolled_up) SELECT {_KEY}, {_ROLLED_COUNTS},"  # noqa: S608
            f" min(first_seen), max(last_seen), 1 FROM flows WHERE {window} GROUP BY {_KEY}",
            (start, end),
        )
        n = c.execute(f"DELETE FROM flows WHERE {window}", (start, end)).rowcount  # noqa: S608
        c.execute("COMMIT")
    except BaseException:
        c.execute("ROLLBACK")
        raise
    return n
