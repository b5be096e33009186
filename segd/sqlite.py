"""SQLite plumbing shared by the server's and the orchestrator's stores.

One SQLite file per daemon, in WAL mode with foreign keys on, synchronous
FULL and a page cache of up to 64 MiB a connection (so a fleet's store is read
from memory, not from the file, while it is written), guarded by an exclusive
lock file so two daemons never share a data dir, and a `schema_version` table
driving numbered migrations, each applied in its own transaction.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from segd import files
from segd.errors import Conflict, Unavailable

PRAGMAS = (
    "PRAGMA foreign_keys = ON",
    "PRAGMA synchronous = FULL",
    "PRAGMA busy_timeout = 5000",
    "PRAGMA cache_size = -65536",
)


def lock_data_dir(db: Path, daemon: str) -> int:
    """Take `<db>.lock` exclusively; Conflict when another daemon holds it."""
    path = db.with_name(db.name + ".lock")
    fd = files.try_lock(path)
    if fd is None:
        raise Conflict(f"another segd {daemon} is using {path.parent}")
    return fd


def migrate(conn: sqlite3.Connection, migrations: Sequence[str]) -> None:
    """Apply the migrations this file does not have yet, each in a transaction."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    if row is None:
        conn.execute("INSERT INTO schema_version (version) VALUES (0)")
        current = 0
    else:
        current = int(row[0])
    if current > len(migrations):
        raise Unavailable(
            f"store schema version {current} is newer than this segd ({len(migrations)})"
        )
    for version in range(current, len(migrations)):
        script = (
            "BEGIN IMMEDIATE;\n"
            + migrations[version]
            + f"\nUPDATE schema_version SET version = {version + 1};\nCOMMIT;"
        )
        try:
            conn.executescript(script)
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise


def open_migrated(path: Path, migrations: Sequence[str]) -> sqlite3.Connection:
    """A connection in WAL mode with the pragmas set and the schema current
    (blocking: run it on a worker thread)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode = WAL")
        for p in PRAGMAS:
            conn.execute(p)
        migrate(conn, migrations)
    except BaseException:
        conn.close()
        raise
    return conn
