"""The server's durable state: one SQLite file in WAL mode. All SQL lives here.

Two connections: a writer whose changes are group-committed (`commit.py`:
writers run one after another, each in its own savepoint of a shared `BEGIN
IMMEDIATE` transaction, so a check-then-update cannot race, and each returns
once the transaction is durable), and a query-only reader that sees committed
data only. `synchronous=FULL` makes an acknowledged commit survive a power cut.
A lock file keeps a second server off the same data dir.

A write that can change a host's instructions leaves a typed change record
(`changes`); once its transaction is durable the store hands that
transaction's records, in statement order, with its generation to the one
function that follows it (`follow`). The generation counts the commits that
had changes and is written in the same transaction, so it never goes back;
the per-host versions the follower derives from it are persisted with the next
transaction (`persist_versions`), or on close.

SQLite failures surface as `Unavailable` (HTTP 503) and constraint failures as
`Conflict`; callers never see a raw `sqlite3` error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import aiosqlite
import msgspec

from segd import log, sqlite, wire
from segd.errors import Unavailable
from segd.policy import Labels, Selectors
from segd.server import changes as ch
from segd.server.commit import GroupCommit, map_error
from segd.server.migrations import MIGRATIONS

_log = log.get("segd.server.store")

_enc = msgspec.json.Encoder(order="deterministic")
_labels = msgspec.json.Decoder(Labels)
_selectors: msgspec.json.Decoder[Selectors] = msgspec.json.Decoder(Selectors)
_strings = msgspec.json.Decoder(list[str])


def _j(value: object) -> str:
    return _enc.encode(value).decode()


# ---- row converters -----------------------------------------------------------------


def _rule(r: sqlite3.Row) -> wire.Rule:
    return wire.Rule(
        id=r["id"],
        providers=_selectors.decode(r["providers"]),
        consumers=_selectors.decode(r["consumers"]),
        services=_strings.decode(r["services"]),
        options=_strings.decode(r["options"]),
        description=r["description"],
        created_at=r["created_at"],
        provider_ips=_strings.decode(r["provider_ips"]),
        consumer_ips=_strings.decode(r["consumer_ips"]),
    )


def _profile(r: sqlite3.Row, p: str = "") -> wire.Profile:
    """The profile in row `r`, its columns named with the prefix `p`."""
    return wire.Profile(
        id=r[p + "id"],
        name=r[p + "name"],
        labels=_labels.decode(r[p + "labels"]),
        locked=_strings.decode(r[p + "locked"]),
        max_uses=r[p + "max_uses"],
        lifespan_s=r[p + "lifespan_s"],
        on_mismatch=r[p + "on_mismatch"],
        enabled=bool(r[p + "enabled"]),
        description=r[p + "description"],
        created_at=r[p + "created_at"],
        mode=r[p + "mode"],
        visibility=r[p + "visibility"],
    )


def _key(r: sqlite3.Row) -> wire.PairingKey:
    return wire.PairingKey(
        key_id=r["key_id"],
        profile=r["profile_name"],
        max_uses=r["max_uses"],
        uses=r["uses"],
        issued_at=r["issued_at"],
        expires_at=r["expires_at"],
        revoked=bool(r["revoked"]),
        description=r["description"],
    )


def _workload(r: sqlite3.Row) -> wire.Workload:
    return wire.Workload(
        id=r["id"],
        host_id=r["host_id"],
        container_id=r["container_id"],
        name=r["name"],
        labels=_labels.decode(r["labels"]),
        ips=_strings.decode(r["ips"]),
        key_id=r["key_id"],
        paired_at=r["paired_at"],
        mode=r["mode"],
        mode_override=r["mode_override"],
        visibility=r["visibility"],
    )


def _mesh_state(r: sqlite3.Row) -> wire.MeshState:
    if not r["mesh_subnet"]:
        return "off"
    return "revoked" if r["revoked"] else "up"


def _host(r: sqlite3.Row) -> wire.Host:
    return wire.Host(
        id=r["id"],
        hostname=r["hostname"],
        public_key=r["public_key"],
        registered_at=r["registered_at"],
        last_seen=r["last_seen"],
        instructions_version=r["instructions_version"],
        revoked=bool(r["revoked"]),
        workloads=r["n_workloads"],
        subnet=r["mesh_subnet"],
        endpoint=r["mesh_endpoint"],
        mesh_public_key=r["mesh_public_key"],
        mesh=_mesh_state(r),
    )


def _audit(r: sqlite3.Row) -> wire.AuditEntry:
    return wire.AuditEntry(
        id=r["id"],
        at=r["at"],
        event=r["event"],
        result=r["result"],
        reason=r["reason"],
        host_id=r["host_id"],
        container_id=r["container_id"],
        key_id=r["key_id"],
        workload_id=r["workload_id"],
        detail=r["detail"],
    )


_KEY_SELECT = (
    "SELECT k.*, p.name AS profile_name FROM keys k JOIN profiles p ON p.id = k.profile_id"
)
# A key and its profile in one row: the profile's columns prefixed `p_`.
_KEY_PROFILE_SELECT = (
    "SELECT k.*, p.name AS profile_name, p.id AS p_id, p.name AS p_name,"
    " p.labels AS p_labels, p.locked AS p_locked, p.max_uses AS p_max_uses,"
    " p.lifespan_s AS p_lifespan_s, p.on_mismatch AS p_on_mismatch, p.enabled AS p_enabled,"
    " p.description AS p_description, p.created_at AS p_created_at, p.mode AS p_mode,"
    " p.visibility AS p_visibility"
    " FROM keys k JOIN profiles p ON p.id = k.profile_id WHERE k.key_id = ?"
)
_HOST_SELECT = (
    "SELECT h.*, (SELECT count(*) FROM workloads w WHERE w.host_id = h.id) AS n_workloads "
    "FROM hosts h"
)


# Columns of the host and flags first; `w.*` last, all NULL when the container has
# no workload. Parameters: container id, key id, host id.
_PAIRING_VIEW = (
    "SELECT h.revoked AS h_revoked, h.mesh_subnet AS h_subnet,"
    " EXISTS (SELECT 1 FROM held_containers c"
    "  WHERE c.host_id = h.id AND c.container_id = ?1) AS is_held,"
    " EXISTS (SELECT 1 FROM admissions a"
    "  WHERE a.host_id = h.id AND a.container_id = ?1 AND a.key_id = ?2) AS is_admitted,"
    " w.*"
    " FROM hosts h LEFT JOIN workloads w ON w.host_id = h.id AND w.container_id = ?1"
    " WHERE h.id = ?3"
)


class PairingView(NamedTuple):
    live: bool  # the host is registered and not revoked
    subnet: str  # its mesh subnet; empty when it has not joined the mesh
    workload: wire.Workload | None
    held: bool  # an admin unpaired the container: it does not pair again
    admitted: bool  # the key admitted the container before: pairing it again is free


ScopeOf = Callable[[str, str], str]  # (host id, address) -> the scope it is unique in


def host_local(host_id: str, ip: str) -> str:
    """Without a mesh every address is host-local: unique on its host."""
    return host_id


class Tx:
    """One writer's part of a write transaction; only valid inside `Store.write()`.

    Its statements are synchronous (they run against SQLite's page cache). Those
    that can change a host's instructions also note a change record, delivered
    once the transaction is durable; a writer whose body fails leaves none.
    """

    def __init__(
        self, conn: sqlite3.Connection, changes: list[ch.Change], scope_of: ScopeOf = host_local
    ) -> None:
        self._c = conn
        self._changes = changes
        self.scope_of = scope_of

    def _one(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._c.execute(sql, tuple(params)).fetchone()
        return row

    def _all(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        return self._c.execute(sql, tuple(params)).fetchall()

    def _exec(self, sql: str, params: Iterable[Any] = ()) -> int:
        return self._c.execute(sql, tuple(params)).rowcount

    # ---- rules --------------------------------------------------------------------

    def insert_rule(self, r: wire.Rule) -> None:
        self._exec(
            "INSERT INTO rules (id, providers, consumers, services, options, description,"
            " created_at, provider_ips, consumer_ips) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.id,
                _j(r.providers),
                _j(r.consumers),
                _j(r.services),
                _j(r.options),
                r.description,
                r.created_at,
                _j(r.provider_ips),
                _j(r.consumer_ips),
            ),
        )
        self._changes.append(ch.RulesSet(self.rules()))

    def delete_rule(self, rule_id: str) -> bool:
        if self._exec("DELETE FROM rules WHERE id = ?", (rule_id,)) == 0:
            return False
        self._changes.append(ch.RulesSet(self.rules()))
        return True

    def rules(self) -> list[wire.Rule]:
        return [_rule(r) for r in self._all("SELECT * FROM rules ORDER BY created_at, id")]

    # ---- profiles and keys --------------------------------------------------------

    def insert_profile(self, p: wire.Profile) -> None:
        self._exec(
            "INSERT INTO profiles (id, name, labels, locked, max_uses, lifespan_s, on_mismatch,"
            " enabled, description, created_at, mode, visibility)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                p.id,
                p.name,
                _j(p.labels),
                _j(p.locked),
                p.max_uses,
                p.lifespan_s,
                p.on_mismatch,
                int(p.enabled),
                p.description,
                p.created_at,
                p.mode,
                p.visibility,
            ),
        )

    def profile_by_name(self, name: str) -> wire.Profile | None:
        row = self._one("SELECT * FROM profiles WHERE name = ?", (name,))
        return _profile(row) if row else None

    def delete_profile(self, profile_id: str) -> int:
        """Delete a profile and its keys; return how many keys went with it."""
        n = self._one("SELECT count(*) AS n FROM keys WHERE profile_id = ?", (profile_id,))
        self._exec("DELETE FROM profiles WHERE id = ?", (profile_id,))
        return int(n["n"]) if n else 0

    def revoke_profile_keys(self, profile_id: str) -> int:
        return self._exec(
            "UPDATE keys SET revoked = 1 WHERE profile_id = ? AND revoked = 0", (profile_id,)
        )

    def insert_key(self, k: wire.PairingKey, profile_id: str) -> None:
        self._exec(
            "INSERT INTO keys (key_id, profile_id, max_uses, uses, issued_at, expires_at,"
            " revoked, description) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                k.key_id,
                profile_id,
                k.max_uses,
                k.uses,
                k.issued_at,
                k.expires_at,
                int(k.revoked),
                k.description,
            ),
        )

    def key_with_profile(self, key_id: str) -> tuple[wire.PairingKey, wire.Profile] | None:
        row = self._one(_KEY_PROFILE_SELECT, (key_id,))
        return None if row is None else (_key(row), _profile(row, "p_"))

    def revoke_key(self, key_id: str) -> bool:
        return self._exec("UPDATE keys SET revoked = 1 WHERE key_id = ?", (key_id,)) > 0

    def consume_use(self, key_id: str, now: float) -> bool:
        """Count one use, only while the key is live: the guard against over-use."""
        n = self._exec(
            "UPDATE keys SET uses = uses + 1 WHERE key_id = ?"
            " AND (max_uses IS NULL OR uses < max_uses) AND revoked = 0 AND expires_at > ?",
            (key_id, now),
        )
        return n == 1

    def admit(self, host_id: str, container_id: str, key_id: str, now: float) -> None:
        self._exec(
            "INSERT OR IGNORE INTO admissions (host_id, container_id, key_id, admitted_at)"
            " VALUES (?, ?, ?, ?)",
            (host_id, container_id, key_id, now),
        )

    def hold(self, w: wire.Workload, now: float) -> None:
        """Keep an admin-unpaired workload's container from pairing again."""
        self._exec(
            "INSERT OR REPLACE INTO held_containers (host_id, container_id, workload_id,"
            " held_at) VALUES (?, ?, ?, ?)",
            (w.host_id, w.container_id, w.id, now),
        )
        self._exec(
            "DELETE FROM admissions WHERE host_id = ? AND container_id = ?",
            (w.host_id, w.container_id),
        )

    # ---- workloads ----------------------------------------------------------------

    def pairing_view(self, host_id: str, container_id: str, key_id: str) -> PairingView:
        """What a pairing of this container with this key id reads first, in one
        statement: whether the host is live, the container's workload, whether an
        admin holds it, whether the key admitted it before."""
        row = self._one(_PAIRING_VIEW, (container_id, key_id, host_id))
        if row is None:
            return PairingView(live=False, subnet="", workload=None, held=False, admitted=False)
        return PairingView(
            live=row["h_revoked"] == 0,
            subnet=row["h_subnet"],
            workload=_workload(row) if row["id"] is not None else None,
            held=bool(row["is_held"]),
            admitted=bool(row["is_admitted"]),
        )

    def workload_by_container(self, host_id: str, container_id: str) -> wire.Workload | None:
        row = self._one(
            "SELECT * FROM workloads WHERE host_id = ? AND container_id = ?",
            (host_id, container_id),
        )
        return _workload(row) if row else None

    def workload(self, workload_id: str) -> wire.Workload | None:
        row = self._one("SELECT * FROM workloads WHERE id = ?", (workload_id,))
        return _workload(row) if row else None

    def workloads_of_key(self, key_id: str) -> list[wire.Workload]:
        rows = self._all("SELECT * FROM workloads WHERE key_id = ? ORDER BY id", (key_id,))
        return [_workload(r) for r in rows]

    def workloads_of_profile(self, profile_id: str) -> list[wire.Workload]:
        rows = self._all(
            "SELECT * FROM workloads WHERE key_id IN"
            " (SELECT key_id FROM keys WHERE profile_id = ?) ORDER BY id",
            (profile_id,),
        )
        return [_workload(r) for r in rows]

    def workloads_of_host(self, host_id: str) -> list[wire.Workload]:
        rows = self._all("SELECT * FROM workloads WHERE host_id = ? ORDER BY id", (host_id,))
        return [_workload(r) for r in rows]

    def ip_holders(self, host_id: str, ips: Iterable[str]) -> dict[str, str]:
        """Which of `ips` (of a workload on `host_id`) are held in their scope, and
        by which workload id."""
        scoped = [(self.scope_of(host_id, ip), ip) for ip in ips]
        if not scoped:
            return {}
        # Placeholders only (the values are bound); an OR of key lookups, which
        # uses the primary key (a row-value IN scans the table).
        marks = " OR ".join("(scope = ? AND ip = ?)" for _ in scoped)
        sql = f"SELECT ip, workload_id FROM workload_ips WHERE {marks}"  # noqa: S608
        rows = self._all(sql, [v for pair in scoped for v in pair])
        return {r["ip"]: r["workload_id"] for r in rows}

    def insert_workload(self, w: wire.Workload) -> None:
        self._exec(
            "INSERT INTO workloads (id, host_id, container_id, name, labels, ips, key_id,"
            " paired_at, mode, mode_override, visibility) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                w.id,
                w.host_id,
                w.container_id,
                w.name,
                _j(w.labels),
                _j(w.ips),
                w.key_id,
                w.paired_at,
                w.mode,
                w.mode_override,
                w.visibility,
            ),
        )
        self._insert_ips(w)
        self._changes.append(ch.WorkloadAdded(w))

    def _insert_ips(self, w: wire.Workload) -> None:
        for ip in w.ips:  # one or two: cheaper than executemany
            self._c.execute(
                "INSERT INTO workload_ips (scope, ip, workload_id) VALUES (?, ?, ?)",
                (self.scope_of(w.host_id, ip), ip, w.id),
            )

    def readdress_workload(self, w: wire.Workload) -> None:
        """Give the workload `w.id` the addresses `w.ips` (`w` is it, readdressed)."""
        self._exec("DELETE FROM workload_ips WHERE workload_id = ?", (w.id,))
        self._exec("UPDATE workloads SET ips = ? WHERE id = ?", (_j(w.ips), w.id))
        self._insert_ips(w)
        self._changes.append(ch.WorkloadReaddressed(w))

    def delete_workload(self, workload_id: str) -> bool:
        if self._exec("DELETE FROM workloads WHERE id = ?", (workload_id,)) == 0:
            return False
        self._changes.append(ch.WorkloadRemoved(workload_id))
        return True

    # ---- modes (see `segd.server.modes`) -------------------------------------------

    def set_profile_mode(
        self, profile_id: str, mode: wire.Mode, visibility: wire.VisibilityLevel
    ) -> list[wire.Workload]:
        """Set a profile's mode and visibility and put them in effect on the workloads
        its keys paired (those with a mode of their own keep it); return those whose
        mode or visibility changed, as they are now."""
        self._exec(
            "UPDATE profiles SET mode = ?, visibility = ? WHERE id = ?",
            (mode, visibility, profile_id),
        )
        rows = self._all(
            "UPDATE workloads SET mode = coalesce(mode_override, ?), visibility = ?"
            " WHERE key_id IN (SELECT key_id FROM keys WHERE profile_id = ?)"
            " AND (mode != coalesce(mode_override, ?) OR visibility != ?) RETURNING *",
            (mode, visibility, profile_id, mode, visibility),
        )
        out = sorted((_workload(r) for r in rows), key=lambda w: w.id)
        self._changes.extend(ch.WorkloadModeSet(w) for w in out)
        return out

    def set_workload_mode(self, w: wire.Workload) -> None:
        """Write `w`'s mode, own mode and visibility (`w` is the workload, changed)."""
        self._exec(
            "UPDATE workloads SET mode = ?, mode_override = ?, visibility = ? WHERE id = ?",
            (w.mode, w.mode_override, w.visibility, w.id),
        )
        self._changes.append(ch.WorkloadModeSet(w))

    def set_sidecars(self, host_id: str, sidecars: Iterable[wire.SidecarIn]) -> None:
        """Replace the host's sidecars (containers sharing another's namespace)."""
        self._exec("DELETE FROM sidecars WHERE host_id = ?", (host_id,))
        self._c.executemany(
            "INSERT INTO sidecars (host_id, container_id, name, shares) VALUES (?, ?, ?, ?)",
            [(host_id, c.container_id, c.name, c.shares) for c in sidecars],
        )

    # ---- hosts and activation codes -----------------------------------------------

    def insert_activation_code(self, code_hash: str, now: float, expires_at: float) -> None:
        self._exec(
            "INSERT INTO activation_codes (code_hash, created_at, expires_at) VALUES (?, ?, ?)",
            (code_hash, now, expires_at),
        )

    def consume_activation_code(self, code_hash: str, now: float, host_id: str) -> bool:
        n = self._exec(
            "UPDATE activation_codes SET used_at = ?, host_id = ?"
            " WHERE code_hash = ? AND used_at IS NULL AND expires_at > ?",
            (now, host_id, code_hash, now),
        )
        return n == 1

    def insert_host(self, host_id: str, hostname: str, public_key: str, now: float) -> None:
        self._exec(
            "INSERT INTO hosts (id, hostname, public_key, registered_at, last_seen)"
            " VALUES (?, ?, ?, ?, ?)",
            (host_id, hostname, public_key, now, now),
        )
        self._changes.append(ch.HostAdded(host_id, public_key))

    def host_revoked(self, host_id: str) -> bool | None:
        """Whether the host is revoked, as this transaction sees it; None if unknown."""
        row = self._one("SELECT revoked FROM hosts WHERE id = ?", (host_id,))
        return None if row is None else bool(row["revoked"])

    def host_with_key(self, public_key: str) -> str | None:
        row = self._one("SELECT id FROM hosts WHERE public_key = ?", (public_key,))
        return str(row["id"]) if row else None

    def revoke_host(self, host_id: str) -> bool:
        """Mark the host revoked and forget what its containers were admitted or held for."""
        if self._exec("UPDATE hosts SET revoked = 1 WHERE id = ?", (host_id,)) == 0:
            return False
        self._exec("DELETE FROM admissions WHERE host_id = ?", (host_id,))
        self._exec("DELETE FROM held_containers WHERE host_id = ?", (host_id,))
        self._changes.append(ch.HostRevoked(host_id))
        return True

    def mesh_subnets(self) -> set[str]:
        """Every subnet given to a host, revoked hosts' too."""
        return {r[0] for r in self._all("SELECT mesh_subnet FROM hosts WHERE mesh_subnet != ''")}

    def host_mesh(self, host_id: str) -> wire.MeshPeer | None:
        """The host's part of the mesh (subnet, key, endpoint); None if it never joined."""
        row = self._one(
            "SELECT mesh_subnet, mesh_public_key, mesh_endpoint FROM hosts WHERE id = ?",
            (host_id,),
        )
        if row is None or not row["mesh_subnet"]:
            return None
        return wire.MeshPeer(host_id, row["mesh_public_key"], row["mesh_endpoint"], row[0])

    def mesh_key_holder(self, public_key: str) -> str | None:
        row = self._one("SELECT id FROM hosts WHERE mesh_public_key = ?", (public_key,))
        return str(row["id"]) if row else None

    def join_mesh(self, peer: wire.MeshPeer) -> None:
        """Record the host's subnet, WireGuard key and endpoint (its peers follow)."""
        self._exec(
            "UPDATE hosts SET mesh_subnet = ?, mesh_public_key = ?, mesh_endpoint = ? WHERE id = ?",
            (peer.subnet, peer.public_key, peer.endpoint, peer.host_id),
        )
        self._changes.append(ch.HostMeshJoined(peer))

    def touch_host(self, host_id: str, now: float) -> None:
        self._exec("UPDATE hosts SET last_seen = ? WHERE id = ?", (now, host_id))

    def recompiled(self, host_ids: Iterable[str]) -> None:
        """Note hosts whose compiled content differs from what was persisted for it:
        they get this transaction's generation as their version."""
        self._changes.append(ch.HostsRecompiled(sorted(host_ids)))

    def set_replay_mark(self, host_id: str, ts: float) -> None:
        """Raise the host's replay mark to `ts` (it never goes down)."""
        self._exec("UPDATE hosts SET replay_mark = max(replay_mark, ?) WHERE id = ?", (ts, host_id))

    # ---- admin tokens and audit ---------------------------------------------------

    def insert_admin_token(self, token_hash: str, now: float) -> None:
        self._exec(
            "INSERT OR IGNORE INTO admin_tokens (token_hash, created_at) VALUES (?, ?)",
            (token_hash, now),
        )

    def keep_only_admin_token(self, token_hash: str, now: float) -> int:
        """Make `token_hash` the one admin token; return how many others were dropped."""
        dropped = self._exec("DELETE FROM admin_tokens WHERE token_hash != ?", (token_hash,))
        self.insert_admin_token(token_hash, now)
        return dropped

    def prune_audit(self, cutoff: float, limit: int) -> int:
        """Delete up to `limit` of the oldest entries from before `cutoff`."""
        self._exec("UPDATE audit_retention SET cutoff = ?", (cutoff,))
        return self._exec(
            "DELETE FROM audit WHERE id IN"
            " (SELECT id FROM audit WHERE at < ? ORDER BY at, id LIMIT ?)",
            (cutoff, limit),
        )

    def audit(
        self,
        at: float,
        event: str,
        result: str,
        reason: str = "",
        *,
        host_id: str = "",
        container_id: str = "",
        key_id: str = "",
        workload_id: str = "",
        detail: str = "",
    ) -> None:
        self._exec(
            "INSERT INTO audit (at, event, result, reason, host_id, container_id, key_id,"
            " workload_id, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (at, event, result, reason, host_id, container_id, key_id, workload_id, detail),
        )


class Store:
    """The open store. Use `await Store.open(path)` and `await store.close()`."""

    def __init__(
        self, path: Path, writer: sqlite3.Connection, reader: aiosqlite.Connection, lock_fd: int
    ) -> None:
        self.path = path
        self._w = writer
        self._r = reader
        self._lock_fd = lock_fd
        row = writer.execute("SELECT value, versions_through FROM generation").fetchone()
        self.generation: int = row[0]  # of the last durable commit with changes
        # Up to which generation every host's version is persisted: below
        # `generation` after a crash, when some were not (see `persist_versions`).
        self.versions_through: int = row[1]
        self._follower: Callable[[ch.Commit], None] | None = None
        # The scope each workload address is unique in (the server sets it from
        # its mesh pool).
        self.scope_of: ScopeOf = host_local
        self._due: dict[str, tuple[int, str]] = {}  # host versions to persist
        self._writing: dict[str, tuple[int, str]] = {}  # those in the sealed transaction
        self._commits = GroupCommit(writer, _Sealer(self))

    @property
    def commits(self) -> int:
        """How many transactions have become durable since the store was opened."""
        return self._commits.commits

    def follow(self, fn: Callable[[ch.Commit], None]) -> None:
        """Hand every later durable commit that has changes to `fn`, in commit order,
        on the event loop, before any of its writers is answered."""
        self._follower = fn

    def persist_versions(self, versions: Mapping[str, tuple[int, str]]) -> None:
        """Write (instructions version, content digest) per host with the next
        transaction (or on close). Those lost in a crash are made good at start:
        `versions_through` is then below `generation`, and every host gets a new
        generation (no version handed out is ever reused for other content)."""
        self._due.update(versions)

    @classmethod
    async def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = sqlite.lock_data_dir(path, "server")
        w: sqlite3.Connection | None = None
        try:
            w = await asyncio.to_thread(sqlite.open_migrated, path, MIGRATIONS)
            r = await aiosqlite.connect(path, isolation_level=None)
            try:
                r.row_factory = sqlite3.Row
                for p in (*sqlite.PRAGMAS, "PRAGMA query_only = ON"):
                    await r.execute(p)
            except BaseException:
                await r.close()
                raise
        except BaseException as e:
            if w is not None:
                w.close()
            os.close(lock_fd)
            if isinstance(e, sqlite3.Error):
                raise Unavailable(f"cannot open store {path}: {e}") from None
            raise
        return cls(path, w, r, lock_fd)

    async def flush(self) -> None:
        """Persist the host versions still due, now."""
        if self._due or self.versions_through < self.generation:
            async with self.write():
                pass

    async def close(self) -> None:
        try:
            with contextlib.suppress(Unavailable):  # made good at the next start
                await self.flush()
            await self._commits.close()
            await self._r.close()
            self._w.close()
        finally:
            os.close(self._lock_fd)

    async def set_read_only(self, on: bool) -> None:
        """Refuse (or allow again) every write, as an unwritable disk would."""
        await self._commits.when_idle(
            lambda c: c.execute(f"PRAGMA query_only = {'ON' if on else 'OFF'}")
        )

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[Tx]:
        """One writer's part of a (group-committed) write transaction: returns once
        it is durable; rolled back, its change records dropped, when the body raises."""
        async with self._commits.write() as changes:
            yield Tx(self._w, changes, self.scope_of)

    async def _all(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            async with self._r.execute(sql, tuple(params)) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as e:
            raise map_error(e) from None

    # ---- reads (committed state) --------------------------------------------------

    async def rules(self) -> list[wire.Rule]:
        return [_rule(r) for r in await self._all("SELECT * FROM rules ORDER BY created_at, id")]

    async def profiles(self) -> list[wire.Profile]:
        return [_profile(r) for r in await self._all("SELECT * FROM profiles ORDER BY name")]

    async def profile_by_name(self, name: str) -> wire.Profile | None:
        rows = await self._all("SELECT * FROM profiles WHERE name = ?", (name,))
        return _profile(rows[0]) if rows else None

    async def keys(self, profile: str | None = None) -> list[wire.PairingKey]:
        if profile is None:
            rows = await self._all(_KEY_SELECT + " ORDER BY k.issued_at, k.key_id")
        else:
            rows = await self._all(
                _KEY_SELECT + " WHERE p.name = ? ORDER BY k.issued_at, k.key_id", (profile,)
            )
        return [_key(r) for r in rows]

    async def key(self, key_id: str) -> wire.PairingKey | None:
        rows = await self._all(_KEY_SELECT + " WHERE k.key_id = ?", (key_id,))
        return _key(rows[0]) if rows else None

    async def workloads(self, host_id: str | None = None) -> list[wire.Workload]:
        """Workloads, each with the sidecars its host reports in its namespace."""
        # `where` is one of two constant clauses; the host id is bound.
        where, params = ("", ()) if host_id is None else (" WHERE w.host_id = ?", (host_id,))
        sql = f"SELECT * FROM workloads w{where} ORDER BY paired_at, id"  # noqa: S608
        rows = await self._all(sql, params)
        side_rows = await self._all(
            "SELECT s.host_id, s.shares, s.container_id, s.name FROM sidecars s JOIN workloads w"  # noqa: S608
            f" ON w.host_id = s.host_id AND w.container_id = s.shares{where}"
            " ORDER BY s.container_id",
            params,
        )
        sidecars: dict[tuple[str, str], list[wire.Sidecar]] = {}
        for r in side_rows:
            sidecars.setdefault((r["host_id"], r["shares"]), []).append(
                wire.Sidecar(container_id=r["container_id"], name=r["name"])
            )
        out = [_workload(r) for r in rows]
        return [
            msgspec.structs.replace(w, sidecars=sidecars[(w.host_id, w.container_id)])
            if (w.host_id, w.container_id) in sidecars
            else w
            for w in out
        ]

    async def locked_dimensions(self) -> dict[str, list[str]]:
        """Per workload, the dimensions its profile locks (a workload whose profile
        is gone has none)."""
        rows = await self._all(
            "SELECT w.id, p.locked FROM workloads w JOIN keys k ON k.key_id = w.key_id"
            " JOIN profiles p ON p.id = k.profile_id"
        )
        return {r["id"]: _strings.decode(r["locked"]) for r in rows}

    async def hosts(self) -> list[wire.Host]:
        return [_host(r) for r in await self._all(_HOST_SELECT + " ORDER BY registered_at, id")]

    async def host(self, host_id: str) -> wire.Host | None:
        rows = await self._all(_HOST_SELECT + " WHERE h.id = ?", (host_id,))
        return _host(rows[0]) if rows else None

    async def mesh_peers(self) -> list[wire.MeshPeer]:
        """The hosts in the mesh now (joined, not revoked)."""
        rows = await self._all(
            "SELECT id, mesh_public_key, mesh_endpoint, mesh_subnet FROM hosts"
            " WHERE mesh_subnet != '' AND revoked = 0 ORDER BY id"
        )
        return [wire.MeshPeer(r[0], r[1], r[2], r[3]) for r in rows]

    async def host_digests(self) -> dict[str, tuple[int, str]]:
        rows = await self._all("SELECT id, instructions_version, instructions_digest FROM hosts")
        return {r["id"]: (r["instructions_version"], r["instructions_digest"]) for r in rows}

    async def audit(self, limit: int, after: int | None = None) -> list[wire.AuditEntry]:
        """Entries after `after` (oldest first), or else the latest `limit`."""
        if after is None:
            sql = "SELECT * FROM (SELECT * FROM audit ORDER BY id DESC LIMIT ?) ORDER BY id"
            rows = await self._all(sql, (limit,))
        else:
            rows = await self._all(
                "SELECT * FROM audit WHERE id > ? ORDER BY id LIMIT ?", (after, limit)
            )
        return [_audit(r) for r in rows]

    async def replay_marks(self) -> dict[str, float]:
        rows = await self._all("SELECT id, replay_mark FROM hosts WHERE replay_mark > 0")
        return {r["id"]: r["replay_mark"] for r in rows}

    async def audit_count(self) -> int:
        rows = await self._all("SELECT count(*) AS n FROM audit")
        return int(rows[0]["n"])

    async def schema_version(self) -> int:
        rows = await self._all("SELECT version FROM schema_version")
        return int(rows[0]["version"])

    async def admin_token_hashes(self) -> set[str]:
        return {r["token_hash"] for r in await self._all("SELECT token_hash FROM admin_tokens")}


class _Sealer:
    """The store's part of each group commit: the generation, the versions due."""

    def __init__(self, store: Store) -> None:
        self._s = store
        self._through = store.versions_through  # what the sealed transaction records

    def seal(self, changes: list[ch.Change]) -> ch.Commit | None:
        """The generation (when there are changes) and the versions due: those of
        every commit applied so far, so with them the versions are persisted
        through the last durable generation."""
        s = self._s
        commit = ch.Commit(s.generation + 1, changes) if changes else None
        self._through = s.versions_through
        if s._due or s.versions_through < s.generation:
            s._writing, s._due = s._due, {}
            if self._write_versions(s._writing):
                self._through = s.generation
            else:  # tried again with the next transaction
                s._due = {**s._writing, **s._due}
                s._writing = {}
        if commit is not None or self._through != s.versions_through:
            s._w.execute(
                "UPDATE generation SET value = ?, versions_through = ?",
                (commit.generation if commit else s.generation, self._through),
            )
        return commit

    def _write_versions(self, versions: Mapping[str, tuple[int, str]]) -> bool:
        """In a savepoint of their own: failing to record versions must not fail
        the writers they ride with (a start makes good what is missing)."""
        w = self._s._w
        w.execute("SAVEPOINT v")
        ok = True
        try:
            w.executemany(
                "UPDATE hosts SET instructions_version = ?, instructions_digest = ? WHERE id = ?",
                [(v, d, h) for h, (v, d) in versions.items()],
            )
        except sqlite3.Error as e:
            ok = False
            with contextlib.suppress(sqlite3.Error):
                w.execute("ROLLBACK TO v")
            _log.warning("store.versions_not_persisted", error=str(e), hosts=len(versions))
        with contextlib.suppress(sqlite3.Error):
            w.execute("RELEASE v")
        return ok

    def committed(self, commit: ch.Commit | None) -> None:
        s = self._s
        s._writing = {}
        s.versions_through = self._through
        if commit is not None:
            s.generation = commit.generation
            if s._follower is not None:
                s._follower(commit)

    def aborted(self) -> None:
        s = self._s
        s._due = {**s._writing, **s._due}
        s._writing = {}
