"""A server restarted on the same data dir has everything back."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from segd.config import ServerConfig
from segd.errors import Conflict
from segd.server.service import Service
from tests.api.conftest import Admin, AiohttpClient, Clock, MakeAgent, register_agent, start_admin

RULE = {"providers": [{"role": "db"}], "consumers": [{"role": "web"}], "services": ["tcp/5432"]}


async def test_restart_keeps_state_keys_and_tokens(
    api: Admin,
    make_agent: MakeAgent,
    aiohttp_client: AiohttpClient,
    server_cfg: ServerConfig,
    clock: Clock,
) -> None:
    await api.ok("POST", "/v1/rules", RULE, status=201)
    db_key = await api.setup_policy(profile="db", labels={"role": "db"}, max_uses=3)
    web_key = await api.setup_policy(profile="web", labels={"role": "web"})
    a, b = await make_agent("a"), await make_agent("b")
    await a.join_mesh()
    await b.join_mesh()
    assert (await a.pair("db1", db_key, [a.ip(1)]))[0] == 200
    assert (await b.pair("web1", web_key, [b.ip(2)]))[0] == 200
    _, signed_b = await b.instructions()
    before = await api.snapshot()
    key_id = api.svc.pub.key_id
    token = api.token
    await api.client.close()

    api2 = await start_admin(aiohttp_client, server_cfg, clock)
    assert api2.token == token  # the same admin token still works
    assert await api2.snapshot() == before  # rules, profiles, keys, workloads, hosts, versions
    assert api2.svc.pub.key_id == key_id  # the same signing key
    a.client = b.client = api2.client

    # Nothing changed, so agents are not woken and get the very same instructions.
    version_b = b.open(signed_b).version
    assert (await b.instructions(since=version_b))[0] == 204
    status, again = await b.instructions(since=0)
    assert status == 200 and again == signed_b

    # A key issued before the restart still pairs, and the peers are updated.
    status, res = await a.pair("db2", db_key, [a.ip(3)])
    assert status == 200, res
    status, signed = await b.instructions(since=version_b)
    assert status == 200
    assert sorted(next(iter(b.open(signed).sets.values()))) == [a.ip(1), a.ip(3)]
    [key] = await api2.ok("GET", "/v1/keys?profile=db")
    assert key["uses"] == 2
    # Agents registered before the restart are still known; new ones register too.
    assert (await register_agent(api2, clock, "c")).host_id


async def test_restart_bumps_hosts_whose_content_was_never_versioned(
    api: Admin,
    make_agent: MakeAgent,
    aiohttp_client: AiohttpClient,
    server_cfg: ServerConfig,
    clock: Clock,
) -> None:
    """Content that no longer matches the persisted digest (a new compiler, a restored
    store) gets a new version, so no agent holds stale instructions under it."""
    token = await api.setup_policy()
    a = await make_agent()
    await a.pair("c1", token, ["10.0.0.1"])
    [host] = await api.ok("GET", "/v1/hosts")
    await api.client.close()
    with sqlite3.connect(Path(server_cfg.data_dir) / "segd.db") as db:
        db.execute("UPDATE hosts SET instructions_digest = 'stale'")
    db.close()

    api2 = await start_admin(aiohttp_client, server_cfg, clock)
    [after] = await api2.ok("GET", "/v1/hosts")
    assert after["instructions_version"] == host["instructions_version"] + 1
    a.client = api2.client
    status, signed = await a.instructions(since=host["instructions_version"])
    assert status == 200 and a.open(signed).version == after["instructions_version"]


async def test_second_server_on_the_same_data_dir_is_refused(
    api: Admin, server_cfg: ServerConfig
) -> None:
    with pytest.raises(Conflict, match="another segd server"):
        await Service.open(server_cfg)


async def test_versions_lost_in_a_crash_were_handed_out_again_for_other_content(
    api: Admin,
    make_agent: MakeAgent,
    aiohttp_client: AiohttpClient,
    server_cfg: ServerConfig,
    clock: Clock,
) -> None:
    """Hosts' versions are persisted with the transaction after the commit that
    made them. A crash before it (left here by hand: versions behind the
    generation) may have lost versions an agent holds, for content it may no
    longer match once changed back: every host gets a new generation at start."""
    token = await api.setup_policy(max_uses=5)
    a, b = await make_agent("a"), await make_agent("b")
    _, res = await a.pair("c1", token, ["10.0.0.1"])
    held = (await a.paired(res)).version
    assert (await a.unpair("c1"))[0] == 204
    hosts = {h["id"]: h["instructions_version"] for h in await api.ok("GET", "/v1/hosts")}
    await api.client.close()
    with sqlite3.connect(Path(server_cfg.data_dir) / "segd.db") as db:
        generation, through = db.execute(
            "SELECT value, versions_through FROM generation"
        ).fetchone()
        assert through == generation  # a clean close persisted them all
        # As if the crash came before the versions of the pairing and the unpairing
        # were written: a's persisted content (no workload) matches again.
        db.execute("UPDATE generation SET versions_through = ?", (generation - 2,))
        db.execute("UPDATE hosts SET instructions_version = ? WHERE id = ?", (held - 1, a.host_id))
    db.close()

    api2 = await start_admin(aiohttp_client, server_cfg, clock)
    after = {h["id"]: h["instructions_version"] for h in await api2.ok("GET", "/v1/hosts")}
    assert after == {h: generation + 1 for h in (a.host_id, b.host_id)}, (after, generation)
    assert generation + 1 > max(held, *hosts.values())
    a.client = api2.client
    status, signed = await a.instructions(since=held)
    assert status == 200 and a.open(signed).version == generation + 1
    await api2.client.close()
    with sqlite3.connect(Path(server_cfg.data_dir) / "segd.db") as db:
        assert db.execute("SELECT value, versions_through FROM generation").fetchone() == (
            generation + 1,
            generation + 1,
        )
    db.close()
