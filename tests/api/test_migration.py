"""A store written by the first schema, opened by this server: data kept, limits
kept, and the containers already paired restart without a use."""

from __future__ import annotations

import time
from pathlib import Path

import nacl.signing

from segd import crypto, sqlite
from segd.config import ServerConfig
from segd.server import tokens
from segd.server.migrations import MIGRATIONS
from tests.api.conftest import Agent, AiohttpClient, Clock, start_admin

KEY_ID = "k_0123456789abcdef"
PROFILE_ID = "p_0123456789ab"
HOST_ID = "h_0123456789abcdef"


def _first_schema_store(data: Path, agent_key: nacl.signing.VerifyKey) -> str:
    """A v1 store with a one-use key already used by container c1; returns the key's token."""
    data.mkdir(parents=True, mode=0o700)
    server_key = crypto.load_or_create_signing_key(data / "server.key")
    now = int(time.time())
    conn = sqlite.open_migrated(data / "segd.db", MIGRATIONS[:1])
    conn.executescript(
        f"""
        INSERT INTO profiles VALUES ('{PROFILE_ID}', 'db', '{{"role":"db"}}', '["role"]', 1, 3600,
            'deny', 1, '', {now});
        INSERT INTO keys VALUES ('{KEY_ID}', '{PROFILE_ID}', 1, 1, {now}, {now + 3600}, 0, '');
        INSERT INTO hosts (id, hostname, public_key, registered_at, last_seen)
            VALUES ('{HOST_ID}', 'h', '{crypto.b64e(bytes(agent_key))}', {now}, {now});
        INSERT INTO workloads VALUES ('w_0123456789abcdef', '{HOST_ID}', 'c1', '',
            '{{"role":"db"}}', '["10.0.0.1"]', '{KEY_ID}', {now});
        INSERT INTO workload_ips VALUES ('10.0.0.1', 'w_0123456789abcdef');
        """
    )
    conn.close()
    claims = tokens.Claims(
        v=tokens.VERSION,
        kid=KEY_ID,
        pid=PROFILE_ID,
        sk=crypto.key_id_of(server_key.verify_key),
        iat=now,
        exp=now + 3600,
    )
    return tokens.issue(server_key, claims)


async def test_upgraded_store_keeps_its_data_and_readmits_paired_containers(
    aiohttp_client: AiohttpClient, tmp_path: Path, clock: Clock
) -> None:
    agent_key = nacl.signing.SigningKey.generate()
    cfg = ServerConfig(data_dir=str(tmp_path / "server"))
    token = _first_schema_store(Path(cfg.data_dir), agent_key.verify_key)
    api = await start_admin(aiohttp_client, cfg, clock)
    assert await api.svc.store.schema_version() == len(MIGRATIONS)
    [key] = await api.ok("GET", "/v1/keys")
    assert (key["key_id"], key["max_uses"], key["uses"]) == (KEY_ID, 1, 1)
    [prof] = await api.ok("GET", "/v1/profiles")
    assert (prof["name"], prof["max_uses"], prof["locked"]) == ("db", 1, ["role"])
    server_keys = {api.svc.pub.key_id: crypto.b64e(bytes(api.svc.signing_key.verify_key))}
    agent = Agent(api.client, HOST_ID, agent_key, clock, server_keys)
    # c1 restarts: paired again without a use; a new container finds the key used up
    assert (await agent.unpair("c1"))[0] == 204
    status, res = await agent.pair("c1", token, ["10.0.0.2"])
    assert status == 200, res
    status, body = await agent.pair("c2", token, ["10.0.0.3"])
    assert (status, body["error"]) == (403, "key_exhausted")
    assert (await api.ok("GET", "/v1/keys"))[0]["uses"] == 1
    # the new schema takes unlimited keys, and deleting a profile still takes its keys
    await api.ok("POST", "/v1/keys", {"profile": "db", "max_uses": None}, status=201)
    await api.ok("DELETE", "/v1/profiles/db", status=204)
    assert await api.ok("GET", "/v1/keys") == []


async def test_upgraded_addresses_are_host_local_and_rules_have_no_blocks(
    aiohttp_client: AiohttpClient, tmp_path: Path, clock: Clock
) -> None:
    """Addresses paired before address scopes are host-local: another host may
    pair the same one, its own host may not."""
    from tests.api.conftest import register_agent

    agent_key = nacl.signing.SigningKey.generate()
    cfg = ServerConfig(data_dir=str(tmp_path / "server"))
    token = _first_schema_store(Path(cfg.data_dir), agent_key.verify_key)
    conn = sqlite.open_migrated(Path(cfg.data_dir) / "segd.db", MIGRATIONS[:5])
    conn.execute(
        "INSERT INTO rules VALUES ('r_1', ?, ?, ?, '[]', '', 1)",
        ('[{"role":"db"}]', '"any"', '["tcp/1"]'),
    )
    conn.commit()
    conn.close()
    api = await start_admin(aiohttp_client, cfg, clock)
    [rule] = await api.ok("GET", "/v1/rules")
    assert (rule["provider_ips"], rule["consumer_ips"]) == ([], [])
    [host] = await api.ok("GET", "/v1/hosts")
    assert (host["mesh"], host["subnet"]) == ("off", "")
    await api.ok("POST", "/v1/profiles/db/revoke", {})  # the old key is used up anyway
    await api.ok("POST", "/v1/profiles", {"name": "db2", "labels": {"role": "db"}}, status=201)
    new = (await api.ok("POST", "/v1/keys", {"profile": "db2"}, status=201))["token"]
    other = await register_agent(api, clock, "other")
    assert (await other.pair("c1", new, ["10.0.0.1"]))[0] == 200
    server_keys = {api.svc.pub.key_id: crypto.b64e(bytes(api.svc.signing_key.verify_key))}
    agent = Agent(api.client, HOST_ID, agent_key, clock, server_keys)
    status, body = await agent.pair("c2", new, ["10.0.0.1"])
    assert (status, body["error"]) == (403, "ip_in_use")
    assert token
