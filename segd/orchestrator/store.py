"""The orchestrator's durable state: one SQLite file in WAL mode. All SQL lives here.

One connection; every change is one `BEGIN IMMEDIATE` transaction behind an
asyncio lock. A lock file keeps a second orchestrator off the same data dir.
SQLite failures surface as `Unavailable` and constraint failures as `Conflict`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from segd import sqlite
from segd.errors import Conflict, SegdError, Unavailable
from segd.orchestrator import wire
from segd.orchestrator.migrations import MIGRATIONS
from segd.orchestrator.model import ContainerRecord, ProfileRecord
from segd.policy import Labels

_enc = msgspec.json.Encoder(order="deterministic")
_labels = msgspec.json.Decoder(Labels)
_strings = msgspec.json.Decoder(list[str])
_env = msgspec.json.Decoder(dict[str, str])


_CONTAINER_SELECT = (
    "SELECT c.id, c.name, c.created_at, n.name AS node, p.name AS profile"
    " FROM containers c JOIN nodes n ON n.id = c.node_id JOIN profiles p ON p.id = c.profile_id"
)


def _j(value: object) -> str:
    return _enc.encode(value).decode()


def _map_error(e: sqlite3.Error) -> SegdError:
    if isinstance(e, sqlite3.IntegrityError):
        return Conflict(f"conflicting change: {e}")
    return Unavailable(f"store unavailable: {e}")


def _profile(r: sqlite3.Row) -> ProfileRecord:
    return ProfileRecord(
        name=r["name"],
        image=r["image"],
        command=_strings.decode(r["command"]),
        env=_env.decode(r["env"]),
        networks=_strings.decode(r["networks"]),
        labels=_labels.decode(r["labels"]),
        pairing_key=r["pairing_key"],
        description=r["description"],
        created_at=r["created_at"],
    )


def _node(r: sqlite3.Row) -> wire.Node:
    return wire.Node(
        name=r["name"],
        endpoint=r["endpoint"],
        tls_cert=r["tls_cert"],
        tls_key=r["tls_key"],
        tls_ca=r["tls_ca"],
        created_at=r["created_at"],
    )


def _container(r: sqlite3.Row) -> ContainerRecord:
    return ContainerRecord(
        id=r["id"], name=r["name"], node=r["node"], profile=r["profile"], created_at=r["created_at"]
    )


class Store:
    """The open store. Use `await Store.open(path)` and `await store.close()`."""

    def __init__(self, path: Path, conn: aiosqlite.Connection, lock_fd: int) -> None:
        self.path = path
        self._c = conn
        self._lock_fd = lock_fd
        self._wlock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = sqlite.lock_data_dir(path, "orchestrator")
        conn: aiosqlite.Connection | None = None
        try:
            first = await asyncio.to_thread(sqlite.open_migrated, path, MIGRATIONS)
            first.close()
            conn = await aiosqlite.connect(path, isolation_level=None)
            conn.row_factory = sqlite3.Row
            for p in sqlite.PRAGMAS:
                await conn.execute(p)
            for f in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                if f.exists():
                    os.chmod(f, 0o600)  # they hold pairing keys
        except BaseException as e:
            if conn is not None:
                await conn.close()
            os.close(lock_fd)
            if isinstance(e, sqlite3.Error):
                raise Unavailable(f"cannot open store {path}: {e}") from None
            raise
        return cls(path, conn, lock_fd)

    async def close(self) -> None:
        try:
            await self._c.close()
        finally:
            os.close(self._lock_fd)

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._wlock:
            try:
                await self._c.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise _map_error(e) from None
            try:
                yield self._c
                await self._c.execute("COMMIT")
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):
                    await self._c.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise _map_error(e) from None
                raise

    async def _exec(self, sql: str, params: Iterable[Any] = ()) -> int:
        async with self._tx() as c, c.execute(sql, tuple(params)) as cur:
            return cur.rowcount

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            async with self._c.execute(sql, tuple(params)) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as e:
            raise _map_error(e) from None

    # ---- meta and admin tokens ----------------------------------------------------

    async def insert_node_once(self, marker: str, n: wire.Node) -> bool:
        """Insert `n` unless `marker` was set before; True when inserted now.

        One transaction, so the node is registered at most once in the store's
        life and removing it later is final.
        """
        async with self._tx() as c:
            async with c.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?, '1')", (marker,)
            ) as cur:
                if cur.rowcount == 0:
                    return False
            await c.execute(
                "INSERT OR IGNORE INTO nodes (name, endpoint, tls_cert, tls_key, tls_ca,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (n.name, n.endpoint, n.tls_cert, n.tls_key, n.tls_ca, n.created_at),
            )
            return True

    async def admin_token_hashes(self) -> set[str]:
        return {r["token_hash"] for r in await self._all("SELECT token_hash FROM admin_tokens")}

    async def add_admin_token_hash(self, token_hash: str, now: float) -> None:
        await self._exec(
            "INSERT INTO admin_tokens (token_hash, created_at) VALUES (?, ?)", (token_hash, now)
        )

    # ---- profiles -----------------------------------------------------------------

    async def insert_profile(self, p: ProfileRecord) -> None:
        await self._exec(
            "INSERT INTO profiles (name, image, command, env, networks, labels, pairing_key,"
            " description, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                p.name,
                p.image,
                _j(p.command),
                _j(p.env),
                _j(p.networks),
                _j(p.labels),
                p.pairing_key,
                p.description,
                p.created_at,
            ),
        )

    async def profiles(self) -> list[ProfileRecord]:
        return [_profile(r) for r in await self._all("SELECT * FROM profiles ORDER BY name")]

    async def profile(self, name: str) -> ProfileRecord | None:
        rows = await self._all("SELECT * FROM profiles WHERE name = ?", (name,))
        return _profile(rows[0]) if rows else None

    async def set_profile_key(self, name: str, pairing_key: str) -> bool:
        n = await self._exec(
            "UPDATE profiles SET pairing_key = ? WHERE name = ?", (pairing_key, name)
        )
        return n > 0

    async def delete_profile(self, name: str) -> bool:
        return await self._exec("DELETE FROM profiles WHERE name = ?", (name,)) > 0

    # ---- nodes --------------------------------------------------------------------

    async def insert_node(self, n: wire.Node) -> None:
        await self._exec(
            "INSERT INTO nodes (name, endpoint, tls_cert, tls_key, tls_ca, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (n.name, n.endpoint, n.tls_cert, n.tls_key, n.tls_ca, n.created_at),
        )

    async def nodes(self) -> list[wire.Node]:
        return [_node(r) for r in await self._all("SELECT * FROM nodes ORDER BY name")]

    async def node(self, name: str) -> wire.Node | None:
        rows = await self._all("SELECT * FROM nodes WHERE name = ?", (name,))
        return _node(rows[0]) if rows else None

    async def delete_node(self, name: str) -> bool:
        return await self._exec("DELETE FROM nodes WHERE name = ?", (name,)) > 0

    # ---- containers ---------------------------------------------------------------

    async def containers(
        self, *, node: str | None = None, profile: str | None = None
    ) -> list[ContainerRecord]:
        sql, params = _CONTAINER_SELECT + " WHERE 1", list[str]()
        if node is not None:
            sql, params = sql + " AND n.name = ?", [*params, node]
        if profile is not None:
            sql, params = sql + " AND p.name = ?", [*params, profile]
        rows = await self._all(sql + " ORDER BY c.created_at, c.id", params)
        return [_container(r) for r in rows]

    async def find_containers(self, ref: str) -> list[ContainerRecord]:
        """Containers whose id is or starts with `ref`, or whose name is `ref`."""
        rows = await self._all(
            _CONTAINER_SELECT + " WHERE c.id = ? OR c.name = ? OR substr(c.id, 1, length(?)) = ?"
            " ORDER BY c.created_at, c.id",
            (ref, ref, ref, ref),
        )
        return [_container(r) for r in rows]

    async def insert_container(self, c: ContainerRecord) -> None:
        async with self._tx() as conn:
            await _insert_container(conn, c)

    async def delete_container(self, container_id: str) -> bool:
        return await self._exec("DELETE FROM containers WHERE id = ?", (container_id,)) > 0

    async def replace_container(self, old_id: str, new: ContainerRecord) -> None:
        """Record `new` and forget `old_id` in one transaction."""
        async with self._tx() as conn:
            await _insert_container(conn, new)
            await conn.execute("DELETE FROM containers WHERE id = ?", (old_id,))

    async def schema_version(self) -> int:
        rows = await self._all("SELECT version FROM schema_version")
        return int(rows[0]["version"])


async def _insert_container(conn: aiosqlite.Connection, c: ContainerRecord) -> None:
    await conn.execute(
        "INSERT INTO containers (id, node_id, profile_id, name, created_at) VALUES"
        " (?, (SELECT id FROM nodes WHERE name = ?), (SELECT id FROM profiles WHERE name = ?),"
        " ?, ?)",
        (c.id, c.node, c.profile, c.name, c.created_at),
    )
