"""Versioned schema migrations for the server store.

`MIGRATIONS[i]` brings the schema from version `i` to `i + 1`. Scripts are only
ever appended: a released script is never edited. Each one runs in its own
transaction together with the `schema_version` bump, with foreign keys on: a
table is rebuilt by copying it into a new table, dropping the old one once no
other table references it, and renaming the copy.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: the initial schema.
    """
    CREATE TABLE rules (
        id          TEXT PRIMARY KEY,
        providers   TEXT NOT NULL,
        consumers   TEXT NOT NULL,
        services    TEXT NOT NULL,
        options     TEXT NOT NULL,
        description TEXT NOT NULL,
        created_at  REAL NOT NULL
    );

    CREATE TABLE profiles (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        labels      TEXT NOT NULL,
        locked      TEXT NOT NULL,
        max_uses    INTEGER NOT NULL CHECK (max_uses >= 1),
        lifespan_s  INTEGER NOT NULL CHECK (lifespan_s >= 1),
        on_mismatch TEXT NOT NULL CHECK (on_mismatch IN ('deny', 'default')),
        enabled     INTEGER NOT NULL,
        description TEXT NOT NULL,
        created_at  REAL NOT NULL
    );

    CREATE TABLE keys (
        key_id      TEXT PRIMARY KEY,
        profile_id  TEXT NOT NULL REFERENCES profiles(id) ON DELETE CASCADE,
        max_uses    INTEGER NOT NULL CHECK (max_uses >= 1),
        uses        INTEGER NOT NULL DEFAULT 0 CHECK (uses >= 0 AND uses <= max_uses),
        issued_at   REAL NOT NULL,
        expires_at  REAL NOT NULL,
        revoked     INTEGER NOT NULL DEFAULT 0,
        description TEXT NOT NULL
    );
    CREATE INDEX keys_profile ON keys(profile_id);

    CREATE TABLE hosts (
        id                   TEXT PRIMARY KEY,
        hostname             TEXT NOT NULL,
        public_key           TEXT NOT NULL UNIQUE,
        registered_at        REAL NOT NULL,
        last_seen            REAL NOT NULL,
        instructions_version INTEGER NOT NULL DEFAULT 0,
        instructions_digest  TEXT NOT NULL DEFAULT '',
        revoked              INTEGER NOT NULL DEFAULT 0
    );

    -- key_id is deliberately not a foreign key: a workload outlives its key.
    CREATE TABLE workloads (
        id           TEXT PRIMARY KEY,
        host_id      TEXT NOT NULL REFERENCES hosts(id),
        container_id TEXT NOT NULL,
        name         TEXT NOT NULL,
        labels       TEXT NOT NULL,
        ips          TEXT NOT NULL,
        key_id       TEXT NOT NULL,
        paired_at    REAL NOT NULL,
        UNIQUE (host_id, container_id)
    );

    -- One live workload per address: the primary key is the guard.
    CREATE TABLE workload_ips (
        ip          TEXT PRIMARY KEY,
        workload_id TEXT NOT NULL REFERENCES workloads(id) ON DELETE CASCADE
    );
    CREATE INDEX workload_ips_workload ON workload_ips(workload_id);

    CREATE TABLE activation_codes (
        code_hash  TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        used_at    REAL,
        host_id    TEXT
    );

    CREATE TABLE admin_tokens (
        token_hash TEXT PRIMARY KEY,
        created_at REAL NOT NULL
    );

    CREATE TABLE audit (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        at           REAL NOT NULL,
        event        TEXT NOT NULL,
        result       TEXT NOT NULL,
        reason       TEXT NOT NULL,
        host_id      TEXT NOT NULL,
        container_id TEXT NOT NULL,
        key_id       TEXT NOT NULL,
        workload_id  TEXT NOT NULL,
        detail       TEXT NOT NULL
    );
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
    """,
    # 2: containers in another container's network namespace, as each host reports them.
    """
    CREATE TABLE sidecars (
        host_id      TEXT NOT NULL REFERENCES hosts(id),
        container_id TEXT NOT NULL,
        name         TEXT NOT NULL,
        shares       TEXT NOT NULL,
        PRIMARY KEY (host_id, container_id)
    );
    CREATE INDEX sidecars_shares ON sidecars(host_id, shares);
    """,
    # 3: replay marks (the latest agent request stamped ahead of the server clock,
    # per host) and audit retention: entries are deleted only once they are older
    # than the cutoff the pruner has set, and only by it.
    """
    ALTER TABLE hosts ADD COLUMN replay_mark REAL NOT NULL DEFAULT 0;

    CREATE INDEX audit_at ON audit(at);
    CREATE TABLE audit_retention (cutoff REAL NOT NULL);
    INSERT INTO audit_retention (cutoff) VALUES (0);
    DROP TRIGGER audit_no_delete;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    WHEN old.at >= (SELECT cutoff FROM audit_retention)
    BEGIN SELECT RAISE(ABORT, 'audit is append-only: only entries past retention are pruned'); END;
    """,
    # 4: unlimited key uses (max_uses NULL), the containers each key admitted (their
    # restarts pair again without a use), and containers an admin unpaired.
    """
    CREATE TABLE profiles_new (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        labels      TEXT NOT NULL,
        locked      TEXT NOT NULL,
        max_uses    INTEGER CHECK (max_uses IS NULL OR max_uses >= 1),
        lifespan_s  INTEGER NOT NULL CHECK (lifespan_s >= 1),
        on_mismatch TEXT NOT NULL CHECK (on_mismatch IN ('deny', 'default')),
        enabled     INTEGER NOT NULL,
        description TEXT NOT NULL,
        created_at  REAL NOT NULL
    );
    INSERT INTO profiles_new SELECT id, name, labels, locked, max_uses, lifespan_s, on_mismatch,
        enabled, description, created_at FROM profiles;

    CREATE TABLE keys_new (
        key_id      TEXT PRIMARY KEY,
        profile_id  TEXT NOT NULL REFERENCES profiles_new(id) ON DELETE CASCADE,
        max_uses    INTEGER CHECK (max_uses IS NULL OR max_uses >= 1),
        uses        INTEGER NOT NULL DEFAULT 0
                    CHECK (uses >= 0 AND (max_uses IS NULL OR uses <= max_uses)),
        issued_at   REAL NOT NULL,
        expires_at  REAL NOT NULL,
        revoked     INTEGER NOT NULL DEFAULT 0,
        description TEXT NOT NULL
    );
    INSERT INTO keys_new SELECT key_id, profile_id, max_uses, uses, issued_at, expires_at,
        revoked, description FROM keys;

    DROP TABLE keys;
    DROP TABLE profiles;
    -- Renaming rewrites keys_new's reference to the new name.
    ALTER TABLE profiles_new RENAME TO profiles;
    ALTER TABLE keys_new RENAME TO keys;
    CREATE INDEX keys_profile ON keys(profile_id);

    -- A container a key admitted: pairing it again with that key (after a
    -- restart, once the key expired or ran out of uses) uses nothing.
    CREATE TABLE admissions (
        host_id      TEXT NOT NULL REFERENCES hosts(id),
        container_id TEXT NOT NULL,
        key_id       TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
        admitted_at  REAL NOT NULL,
        PRIMARY KEY (host_id, container_id, key_id)
    );
    CREATE INDEX admissions_key ON admissions(key_id);
    INSERT INTO admissions (host_id, container_id, key_id, admitted_at)
        SELECT w.host_id, w.container_id, w.key_id, w.paired_at FROM workloads w
        WHERE w.key_id IN (SELECT key_id FROM keys);

    -- A container an admin unpaired: it does not pair again (a new container does).
    CREATE TABLE held_containers (
        host_id      TEXT NOT NULL REFERENCES hosts(id),
        container_id TEXT NOT NULL,
        workload_id  TEXT NOT NULL,
        held_at      REAL NOT NULL,
        PRIMARY KEY (host_id, container_id)
    );
    """,
    # 5: the generation: one more for every commit that changes instructions, written
    # in that commit; a host's instructions version is the generation of the last
    # commit that changed them. It starts above every version handed out before.
    # The hosts' versions are written with a later transaction: `versions_through`
    # is the generation up to which they all are.
    """
    CREATE TABLE generation (value INTEGER NOT NULL, versions_through INTEGER NOT NULL);
    INSERT INTO generation (value, versions_through)
        SELECT coalesce(max(instructions_version), 0), coalesce(max(instructions_version), 0)
        FROM hosts;
    """,
    # 6: the segd mesh and address scopes. A mesh host's subnet (from the pool;
    # kept when it joins again and while it is revoked, so never given twice), its
    # WireGuard public key and endpoint. A workload address is unique in its
    # scope: '' for mesh addresses (the fleet), the host id for host-local ones
    # (every address paired before had no mesh: host-local).
    """
    ALTER TABLE hosts ADD COLUMN mesh_subnet TEXT NOT NULL DEFAULT '';
    ALTER TABLE hosts ADD COLUMN mesh_public_key TEXT NOT NULL DEFAULT '';
    ALTER TABLE hosts ADD COLUMN mesh_endpoint TEXT NOT NULL DEFAULT '';
    CREATE UNIQUE INDEX hosts_mesh_subnet ON hosts(mesh_subnet) WHERE mesh_subnet != '';
    CREATE UNIQUE INDEX hosts_mesh_key ON hosts(mesh_public_key) WHERE mesh_public_key != '';
    -- a rule side's address blocks (ip: peers)
    ALTER TABLE rules ADD COLUMN provider_ips TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE rules ADD COLUMN consumer_ips TEXT NOT NULL DEFAULT '[]';

    CREATE TABLE workload_ips_new (
        scope       TEXT NOT NULL,
        ip          TEXT NOT NULL,
        workload_id TEXT NOT NULL REFERENCES workloads(id) ON DELETE CASCADE,
        PRIMARY KEY (scope, ip)
    );
    INSERT INTO workload_ips_new (scope, ip, workload_id)
        SELECT w.host_id, i.ip, i.workload_id FROM workload_ips i
        JOIN workloads w ON w.id = i.workload_id;
    DROP TABLE workload_ips;
    ALTER TABLE workload_ips_new RENAME TO workload_ips;
    CREATE INDEX workload_ips_workload ON workload_ips(workload_id);
    """,
]
