"""The segd mesh on the server: joining (`PUT /v1/agent/mesh`), subnets from the
pool, address scopes, and the mesh part of each host's instructions."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from segd import policy
from segd.config import MeshConfig, ServerConfig
from tests.api.conftest import MESH_POOL, Admin, AiohttpClient, Clock, MakeAgent, start_admin

DB, WEB = policy.set_name({"role": "db"}), policy.set_name({"role": "web"})
RULE = {"providers": [{"role": "db"}], "consumers": [{"role": "web"}], "services": ["tcp/5432"]}


GOOD = base64.b64encode(b"k" * 32).decode()


def wg_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


async def _hosts(api: Admin) -> dict[str, Any]:
    return {h["id"]: h for h in await api.ok("GET", "/v1/hosts")}


async def test_join_gives_a_durable_subnet_from_the_pool(api: Admin, make_agent: MakeAgent) -> None:
    a, b = await make_agent("a"), await make_agent("b")
    key = wg_key()
    status, res = await a.request(
        "PUT", "/v1/agent/mesh", {"public_key": key, "endpoint": "192.0.2.1:51820"}
    )
    assert (status, res) == (200, {"subnet": "10.200.0.0/24", "pool": MESH_POOL})
    assert await b.join_mesh("[2001:db8::2]:51820") == "10.200.1.0/24"
    # joining again keeps the subnet and takes the new key and endpoint
    key2 = wg_key()
    assert await a.join_mesh("192.0.2.9:4500", key=key2) == "10.200.0.0/24"
    hosts = await _hosts(api)
    ha, hb = hosts[a.host_id], hosts[b.host_id]
    assert (ha["subnet"], ha["endpoint"], ha["mesh_public_key"], ha["mesh"]) == (
        "10.200.0.0/24",
        "192.0.2.9:4500",
        key2,
        "up",
    )
    assert (hb["endpoint"], hb["mesh"]) == ("[2001:db8::2]:51820", "up")
    c = await make_agent("c")
    assert (await _hosts(api))[c.host_id]["mesh"] == "off"


async def test_revoked_host_keeps_its_subnet(api: Admin, make_agent: MakeAgent) -> None:
    a = await make_agent("a")
    await a.join_mesh()
    await api.ok("POST", f"/v1/hosts/{a.host_id}/revoke")
    assert (await _hosts(api))[a.host_id]["mesh"] == "revoked"
    b = await make_agent("b")
    assert await b.join_mesh() == "10.200.1.0/24"  # a's subnet is not given again
    status, body = await a.request(
        "PUT", "/v1/agent/mesh", {"public_key": wg_key(), "endpoint": "192.0.2.1:1"}
    )
    assert (status, body["error"]) == (403, "host_revoked")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"public_key": "x" * 44, "endpoint": "192.0.2.1:51820"}, "public_key"),
        ({"public_key": base64.b64encode(b"\0" * 32).decode(), "endpoint": "1.2.3.4:1"}, "zero"),
        ({"public_key": base64.b64encode(b"k" * 33).decode()[:44], "endpoint": "1.2.3.4:1"}, "32"),
        ({"public_key": "A" * 42 + "B=", "endpoint": "1.2.3.4:1"}, "32"),  # not canonical
        ({"public_key": "KEY", "endpoint": "1.2.3.4:1"}, "public_key"),
        ({"public_key": GOOD, "endpoint": "192.0.2.1"}, "IP:PORT"),
        ({"public_key": GOOD, "endpoint": "192.0.2.1:0"}, "IP:PORT"),
        ({"public_key": GOOD, "endpoint": "192.0.2.1:65536"}, "IP:PORT"),
        ({"public_key": GOOD, "endpoint": "host.example:51820"}, "not an IP"),
        ({"public_key": GOOD, "endpoint": "2001:db8::1:51820"}, "[IP]:PORT"),
        ({"public_key": GOOD, "endpoint": "[192.0.2.1]:51820"}, "[IP]:PORT"),
        ({"public_key": GOOD, "endpoint": "0.0.0.0:51820"}, "unicast"),
        ({"public_key": GOOD, "endpoint": "224.0.0.1:51820"}, "unicast"),
        ({"public_key": GOOD, "endpoint": "[fe80::1%eth0]:51820"}, "scoped"),
        ({"public_key": GOOD, "endpoint": "1.2.3.4:\u0665\u0661"}, "IP:PORT"),
        ({"public_key": GOOD, "endpoint": "x" * 65}, "length"),
        ({"public_key": GOOD, "endpoint": "1.2.3.4:1", "extra": 1}, "unknown"),
    ],
)
async def test_bad_join_is_refused_and_changes_nothing(
    api: Admin, make_agent: MakeAgent, body: dict[str, Any], needle: str
) -> None:
    a = await make_agent("a")
    before = await api.snapshot()
    status, res = await a.request("PUT", "/v1/agent/mesh", body)
    assert status == 400 and res["error"] == "invalid_input", res
    assert needle in res["message"]
    assert await api.snapshot() == before


async def test_a_wireguard_key_belongs_to_one_host(api: Admin, make_agent: MakeAgent) -> None:
    a, b = await make_agent("a"), await make_agent("b")
    key = wg_key()
    await a.join_mesh(key=key)
    before = await api.snapshot()
    status, res = await b.request(
        "PUT", "/v1/agent/mesh", {"public_key": key, "endpoint": "192.0.2.2:51820"}
    )
    assert (status, res["error"]) == (409, "mesh_key_in_use")
    assert await api.snapshot() == before


async def _server(
    aiohttp_client: AiohttpClient, tmp_path: Path, clock: Clock, mesh: MeshConfig
) -> Admin:
    cfg = ServerConfig(data_dir=str(tmp_path / "other"), mesh=mesh)
    return await start_admin(aiohttp_client, cfg, clock)


async def test_join_without_a_mesh_or_with_the_pool_exhausted_is_409(
    aiohttp_client: AiohttpClient, tmp_path: Path, clock: Clock
) -> None:
    from tests.api.conftest import register_agent

    off = await _server(aiohttp_client, tmp_path / "off", clock, MeshConfig())
    agent = await register_agent(off, clock, "a")
    status, res = await agent.request(
        "PUT", "/v1/agent/mesh", {"public_key": wg_key(), "endpoint": "192.0.2.1:51820"}
    )
    assert (status, res["error"]) == (409, "mesh_not_configured")

    small = await _server(
        aiohttp_client, tmp_path / "small", clock, MeshConfig(pool="10.9.0.0/23", host_prefix=24)
    )
    agents = [await register_agent(small, clock, f"h{i}") for i in range(3)]
    assert [await x.join_mesh() for x in agents[:2]] == ["10.9.0.0/24", "10.9.1.0/24"]
    before = await small.snapshot()
    status, res = await agents[2].request(
        "PUT", "/v1/agent/mesh", {"public_key": wg_key(), "endpoint": "192.0.2.3:51820"}
    )
    assert (status, res["error"]) == (409, "mesh_pool_exhausted")
    assert "10.9.0.0/23" in res["message"]
    assert await small.snapshot() == before


# ---- address scopes ------------------------------------------------------------------


async def test_identical_docker0_addresses_on_two_hosts_both_pair(
    api: Admin, make_agent: MakeAgent
) -> None:
    """Two hosts with Docker's default bridge give their first containers the same
    address: each pairs on its own host (it was refused `ip_in_use` for good), and
    each host's sets hold its own host-local addresses only."""
    await api.ok(
        "POST",
        "/v1/rules",
        {"providers": [{"role": "db"}], "consumers": [{"role": "web"}], "services": ["tcp/1"]},
        status=201,
    )
    db = await api.setup_policy(profile="db", labels={"role": "db"})
    web = await api.setup_policy(profile="web", labels={"role": "web"})
    a, b = await make_agent("a"), await make_agent("b")
    status, res_a = await a.pair("db1", db, ["172.17.0.2"])
    assert status == 200, res_a
    status, res_b = await b.pair("db1", db, ["172.17.0.2"])
    assert status == 200, res_b
    # a web on each host sees its own host's db only: the other's address is its
    # own host's, which means nothing here
    status, res_a = await a.pair("web1", web, ["172.17.0.3"])
    assert status == 200, res_a
    ia = await a.paired(res_a)
    assert ia.sets == {DB: ["172.17.0.2"], WEB: ["172.17.0.3"]}
    status, res_b = await b.pair("web1", web, ["172.17.0.3"])
    assert status == 200
    assert (await b.paired(res_b)).sets == ia.sets
    on_b = [w["ips"] for w in await api.ok("GET", "/v1/workloads") if w["host_id"] == b.host_id]
    assert on_b == [["172.17.0.2"], ["172.17.0.3"]]
    # on its own host the address is still held
    status, body = await a.pair("db2", db, ["172.17.0.2"])
    assert (status, body["error"]) == (403, "ip_in_use")


async def test_host_local_addresses_stay_on_their_host(api: Admin, make_agent: MakeAgent) -> None:
    await api.ok("POST", "/v1/rules", RULE, status=201)
    db = await api.setup_policy(profile="db", labels={"role": "db"})
    web = await api.setup_policy(profile="web", labels={"role": "web"})
    a, b = await make_agent("a"), await make_agent("b")
    await a.join_mesh()
    await b.join_mesh()
    # db on a with a host-local and a mesh address; web on b
    _, on_b = await b.pair("web1", web, [b.ip(5)])
    vb = (await b.paired(on_b)).version
    waiting = asyncio.create_task(b.instructions(since=vb, wait=1.0))
    await asyncio.sleep(0.05)
    status, _ = await a.pair("db0", db, ["172.17.0.9"])  # host-local only
    assert status == 200
    assert await waiting == (204, None)  # b holds nothing that changed
    status, _ = await a.pair("db1", db, ["172.17.0.2", a.ip(7)])
    assert status == 200
    status, signed = await b.instructions(since=vb, wait=2)
    assert status == 200
    assert list(b.open(signed).sets.values()) == [[a.ip(7)]]


@pytest.mark.parametrize("joined", [True, False])
async def test_mesh_address_outside_the_hosts_subnet_is_refused(
    api: Admin, make_agent: MakeAgent, joined: bool
) -> None:
    token = await api.setup_policy()
    a, b = await make_agent("a"), await make_agent("b")
    await a.join_mesh()
    if joined:
        await b.join_mesh()
    before = await api.snapshot()
    # b claims an address of a's subnet (or of the pool, not having joined)
    status, body = await b.pair("c1", token, ["172.17.0.2", a.ip(2)])
    assert (status, body["error"]) == (403, "address_not_in_host_subnet")
    after = await api.snapshot()
    assert after["workloads"] == before["workloads"] and after["keys"] == before["keys"]
    if joined:
        assert (await b.pair("c1", token, [b.ip(2)]))[0] == 200
        status, body = await b.pair("c1", token, [a.ip(3)])  # readdressed: refused too
        assert (status, body["error"]) == (403, "address_not_in_host_subnet")


# ---- the mesh part of the instructions -----------------------------------------------


async def _latest(agent: Any) -> Any:
    status, signed = await agent.instructions(since=0)
    assert status == 200, signed
    return agent.open(signed)


async def test_mesh_peers_are_the_hosts_a_rule_connects(api: Admin, make_agent: MakeAgent) -> None:
    await api.ok("POST", "/v1/rules", RULE, status=201)
    db = await api.setup_policy(profile="db", labels={"role": "db"})
    web = await api.setup_policy(profile="web", labels={"role": "web"})
    other = await api.setup_policy(profile="other", labels={"role": "batch"})
    a, b, c = await make_agent("a"), await make_agent("b"), await make_agent("c")
    keys = {x.host_id: wg_key() for x in (a, b, c)}
    for x, port in ((a, 1), (b, 2), (c, 3)):
        await x.join_mesh(f"192.0.2.{port}:51820", key=keys[x.host_id])
    assert (await a.pair("db1", db, [a.ip(1)]))[0] == 200
    assert (await b.pair("web1", web, [b.ip(1)]))[0] == 200
    assert (await c.pair("batch1", other, [c.ip(1)]))[0] == 200
    ia, ib, ic = await _latest(a), await _latest(b), await _latest(c)
    assert ia.mesh is not None and ib.mesh is not None and ic.mesh is not None
    assert (ia.mesh.pool, ia.mesh.subnet) == (MESH_POOL, a.subnet)
    [pa] = ia.mesh.peers
    assert (pa.host_id, pa.public_key, pa.endpoint, pa.subnet) == (
        b.host_id,
        keys[b.host_id],
        "192.0.2.2:51820",
        b.subnet,
    )
    assert [p.host_id for p in ib.mesh.peers] == [a.host_id]
    assert ic.mesh.peers == []  # unrelated

    # b's new key wakes a (and b), not c
    waits = {
        x.host_id: asyncio.create_task(x.instructions(since=v, wait=1.5))
        for x, v in ((a, ia.version), (c, ic.version))
    }
    await asyncio.sleep(0.05)
    new_key = wg_key()
    await b.join_mesh("192.0.2.22:51820", key=new_key)
    status, signed = await asyncio.wait_for(waits[a.host_id], 2)
    assert status == 200
    [pa] = a.open(signed).mesh.peers  # type: ignore[union-attr]
    assert (pa.public_key, pa.endpoint) == (new_key, "192.0.2.22:51820")
    assert await waits[c.host_id] == (204, None)

    # revoking b drops it from a's peers in that same commit
    await api.ok("POST", f"/v1/hosts/{b.host_id}/revoke")
    ia2 = await _latest(a)
    assert ia2.mesh is not None and ia2.mesh.peers == []
    assert ia2.sets and all(ips == [] for ips in ia2.sets.values())


async def test_a_host_not_in_the_mesh_gets_no_mesh_part(api: Admin, make_agent: MakeAgent) -> None:
    token = await api.setup_policy()
    a = await make_agent("a")
    status, res = await a.pair("c1", token, ["172.17.0.2"])
    assert status == 200
    assert (await a.paired(res)).mesh is None
    status, signed = await a.instructions(since=0)
    assert b'"mesh"' not in msgspec.json.encode(a.open(signed))


# ---- ip: peers and the encrypted option ----------------------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"consumers": [], "consumer_ips": []}, "at least one label set, address block"),
        ({"consumers": [], "consumer_ips": ["10.0.0.1/8"]}, "host bits set"),
        ({"consumers": [], "consumer_ips": ["10.0.0.0/8/8"]}, "consumer_ips"),
        ({"consumers": [], "consumer_ips": ["10.0.0.0/٨"]}, "consumer_ips"),
        ({"consumers": [], "consumer_ips": ["fe80::/64%eth0"]}, "consumer_ips"),
        ({"consumers": [], "consumer_ips": [f"10.{i}.0.0/16" for i in range(65)]}, "length"),
        ({"consumers": "any", "consumer_ips": ["10.0.0.0/8"]}, "'any' cannot be combined"),
        ({"consumer_ips": ["10.0.0.0/8"], "options": ["encrypted"]}, "encrypted rule cannot"),
        ({"provider_ips": ["10.0.0.0/8"], "options": ["encrypted"]}, "encrypted rule cannot"),
        ({"consumers": "any", "options": ["encrypted"]}, "encrypted rule cannot"),
        ({"consumers": [{"role": "web"}], "options": ["secret"]}, "unknown rule option"),
    ],
)
async def test_bad_ip_peers_and_encrypted_rules_are_refused(
    api: Admin, body: dict[str, Any], needle: str
) -> None:
    rule = {"providers": [{"role": "db"}], "consumers": [{"role": "web"}], "services": ["tcp/1"]}
    status, res = await api.call("POST", "/v1/rules", {**rule, **body})
    assert (status, res["error"]) == (400, "invalid_input"), res
    assert needle in res["message"]
    assert await api.ok("GET", "/v1/rules") == []


async def test_ip_peers_reach_the_hosts_of_the_other_side(
    api: Admin, make_agent: MakeAgent
) -> None:
    rule = await api.ok(
        "POST",
        "/v1/rules",
        {
            "providers": [{"role": "db"}],
            "consumers": [],
            "consumer_ips": ["203.0.113.0/24", "2001:DB8::/32", "203.0.113.0/24"],
            "services": ["tcp/5432"],
        },
        status=201,
    )
    assert rule["consumer_ips"] == ["203.0.113.0/24", "2001:db8::/32"]  # canonical, once
    assert rule["consumers"] == []
    db = await api.setup_policy(profile="db", labels={"role": "db"})
    a = await make_agent("a")
    status, res = await a.pair("db1", db, ["172.17.0.2"])
    assert status == 200
    instr = await a.paired(res)
    name = policy.ip_set_name(rule["consumer_ips"])
    assert instr.sets == {name: ["203.0.113.0/24", "2001:db8::/32"]}
    [p] = instr.workloads
    assert [(x.rule_id, x.peer) for x in p.inbound] == [(rule["id"], name)]
    assert instr.rules[0].consumer_ips == rule["consumer_ips"]


async def test_an_encrypted_rule_admits_remote_peers_by_mesh_address_only(
    api: Admin, make_agent: MakeAgent
) -> None:
    await api.ok("POST", "/v1/rules", {**RULE, "options": ["encrypted"]}, status=201)
    db = await api.setup_policy(profile="db", labels={"role": "db"})
    web = await api.setup_policy(profile="web", labels={"role": "web"})
    a, b = await make_agent("a"), await make_agent("b")
    await a.join_mesh()
    await b.join_mesh()
    assert (await a.pair("web-local", web, ["172.17.0.3"]))[0] == 200  # same host as db
    assert (await b.pair("web-remote", web, ["172.17.0.4", b.ip(4)]))[0] == 200
    status, res = await a.pair("db1", db, ["172.17.0.2", a.ip(2)])
    assert status == 200
    instr = await a.paired(res)
    # same-host peer by any address; the remote one by its mesh address only
    assert instr.sets[WEB] == sorted([b.ip(4), "172.17.0.3"])
    assert instr.rules[0].options == ["encrypted"]
    assert instr.mesh is not None and [p.host_id for p in instr.mesh.peers] == [b.host_id]


async def test_the_address_check_looks_up_the_key_not_the_table(api: Admin) -> None:
    """The pairing path's `ip_holders` is a key lookup per address in its scope
    (a row-value IN over the scoped addresses scanned every held address)."""
    store = api.svc.store
    seen: list[tuple[str, list[Any]]] = []
    async with store.write() as tx:
        real = tx._all

        def spy(sql: str, params: Any = ()) -> Any:
            seen.append((sql, list(params)))
            return real(sql, params)

        tx._all = spy  # type: ignore[method-assign]
        assert tx.ip_holders("h_1", ["10.0.0.1", "10.200.0.7", "fd00::1"]) == {}
    [(sql, params)] = seen
    plan = store._w.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
    details = " ".join(str(row[-1]) for row in plan)
    assert "SEARCH workload_ips USING" in details and "SCAN workload_ips" not in details
    assert params == ["h_1", "10.0.0.1", "", "10.200.0.7", "h_1", "fd00::1"]
