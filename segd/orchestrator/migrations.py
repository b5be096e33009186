"""Versioned schema migrations for the orchestrator store.

`MIGRATIONS[i]` brings the schema from version `i` to `i + 1`. Scripts are only
ever appended, never edited. Each runs in one transaction with the version bump.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: the initial schema.
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );

    CREATE TABLE admin_tokens (
        token_hash TEXT PRIMARY KEY,
        created_at REAL NOT NULL
    );

    CREATE TABLE profiles (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        image       TEXT NOT NULL,
        command     TEXT NOT NULL,
        env         TEXT NOT NULL,
        networks    TEXT NOT NULL,
        labels      TEXT NOT NULL,
        pairing_key TEXT NOT NULL,
        description TEXT NOT NULL,
        created_at  REAL NOT NULL
    );

    CREATE TABLE nodes (
        id         INTEGER PRIMARY KEY,
        name       TEXT NOT NULL UNIQUE,
        endpoint   TEXT NOT NULL,
        tls_cert   TEXT NOT NULL,
        tls_key    TEXT NOT NULL,
        tls_ca     TEXT NOT NULL,
        created_at REAL NOT NULL
    );

    -- A profile or node cannot go while a container started from it is recorded.
    CREATE TABLE containers (
        id         TEXT PRIMARY KEY,
        node_id    INTEGER NOT NULL REFERENCES nodes(id) ON DELETE RESTRICT,
        profile_id INTEGER NOT NULL REFERENCES profiles(id) ON DELETE RESTRICT,
        name       TEXT NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (node_id, name)
    );
    CREATE INDEX containers_profile ON containers(profile_id);
    """,
]
