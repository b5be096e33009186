"""Flows: agents' reports kept and resolved by the server's model, listed, exported, streamed."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgspec
import pytest

from segd import wire
from segd.config import FlowsConfig, ServerConfig
from segd.server import flowhttp
from segd.server.flowquery import FlowFilter
from segd.server.flows import STREAM_QUEUE
from tests.api.conftest import (
    Admin,
    Agent,
    AiohttpClient,
    Clock,
    MakeAgent,
    register_agent,
    start_admin,
)

DB = "d" * 64
WEB = "e" * 64
GHOST = "f" * 64  # a container that never paired
# Mesh addresses (known on every host): host a's subnet is the pool's first, b's the next.
DB_IP = "10.200.0.2"
WEB_IP = "10.200.1.3"


def rec(container: str, peer: str, **over: Any) -> dict[str, Any]:
    now = time.time()
    out = {
        "container_id": container,
        "direction": "in",
        "peer_ip": peer,
        "proto": "tcp",
        "port": 5432,
        "verdict": "blocked",
        "connections": 3,
        "first_seen": now - 10,
        "last_seen": now - 5,
    }
    out.update(over)
    return out


async def _shop(api: Admin, make_agent: MakeAgent) -> tuple[Agent, Agent, str, str]:
    """db (DB_IP) on host a, web (WEB_IP) on host b, both in the mesh; web may reach db
    on 5432."""
    db_token = await api.setup_policy(profile="db", labels={"role": "db", "app": "shop"})
    web_token = await api.setup_policy(profile="web", labels={"role": "web", "app": "shop"})
    await api.ok(
        "POST",
        "/v1/rules",
        {
            "providers": [{"role": "db"}],
            "consumers": [{"role": "web"}],
            "services": ["tcp/5432"],
        },
        status=201,
    )
    a = await make_agent("host-a")
    b = await make_agent("host-b")
    await a.join_mesh()
    await b.join_mesh()
    assert (a.ip(2), b.ip(3)) == (DB_IP, WEB_IP)
    status, db = await a.pair(DB, db_token, [DB_IP])
    assert status == 200, db
    status, web = await b.pair(WEB, web_token, [WEB_IP])
    assert status == 200, web
    return a, b, db["workload_id"], web["workload_id"]


async def report(agent: Agent, records: list[dict[str, Any]], lost: int = 0) -> tuple[int, Any]:
    return await agent.request("POST", "/v1/agent/flows", {"records": records, "lost": lost})


async def test_another_hosts_host_local_address_is_external_not_its_workload(
    api: Admin, make_agent: MakeAgent
) -> None:
    """172.17.0.3 on host b's default bridge means nothing on host a: a flow host a
    reports with that peer is external; the same peer reported by b is b's workload."""
    a, b, _, _ = await _shop(api, make_agent)
    web_token = await api.setup_policy(profile="web2", labels={"role": "web", "app": "shop"})
    status, local = await b.pair("c" * 64, web_token, ["172.17.0.3"])
    assert status == 200, local
    assert (await report(a, [rec(DB, "172.17.0.3")]))[0] == 204
    assert (await report(b, [rec(WEB, "172.17.0.3", direction="out", port=80)]))[0] == 204
    flows = (await api.ok("GET", "/v1/flows"))["flows"]
    by = {f["reported_by"]: f for f in flows}
    assert by[a.host_id]["src"] == {"ip": "172.17.0.3", "kind": "external"}
    assert by[b.host_id]["dst"]["workload_id"] == local["workload_id"]


async def test_flows_are_resolved_by_the_servers_model(api: Admin, make_agent: MakeAgent) -> None:
    a, b, db, web = await _shop(api, make_agent)
    rule = (await api.ok("GET", "/v1/rules"))[0]["id"]
    status, _ = await report(
        a,
        [
            rec(DB, WEB_IP, verdict="allowed", rule_id=rule, packets=10, bytes=900),
            rec(DB, "192.0.2.9", port=5432),  # someone outside
        ],
    )
    assert status == 204
    status, _ = await report(b, [rec(GHOST, DB_IP, direction="out")], lost=7)
    assert status == 204
    page = await api.ok("GET", "/v1/flows")
    assert page["next"] == ""
    by = {(f["src"]["ip"], f["reported_by"]): f for f in page["flows"]}
    allowed = by[(WEB_IP, a.host_id)]
    assert allowed["src"] == {
        "ip": WEB_IP,
        "kind": "workload",
        "workload_id": web,
        "labels": {"app": "shop", "role": "web"},
        "host_id": b.host_id,
        "container_id": WEB,
    }
    assert allowed["dst"]["workload_id"] == db and allowed["dst"]["ip"] == DB_IP
    assert (allowed["verdict"], allowed["rule_id"], allowed["port"]) == ("allowed", rule, 5432)
    assert (allowed["packets"], allowed["bytes"], allowed["connections"]) == (10, 900, 3)
    outside = by[("192.0.2.9", a.host_id)]
    assert outside["src"] == {"ip": "192.0.2.9", "kind": "external"}
    ghost = by[("", b.host_id)]
    assert ghost["src"] == {
        "ip": "",
        "kind": "unpaired",
        "host_id": b.host_id,
        "container_id": GHOST,
    }
    assert ghost["dst"]["workload_id"] == db
    svc = api.svc
    assert (svc.flows.ingested, svc.flows.lost) == (3, 7)
    assert await svc.flows.store.losses() == {b.host_id: (7, 0)}


async def test_a_host_reports_only_its_own_containers(api: Admin, make_agent: MakeAgent) -> None:
    a, _b, db, web = await _shop(api, make_agent)
    # host a claims web's container (on host b), and names workloads not its own
    status, _ = await report(
        a,
        [
            rec(WEB, DB_IP, workload_id=web),
            rec(DB, WEB_IP, workload_id=web),
            rec(GHOST, WEB_IP, workload_id=db),
            rec(DB, WEB_IP, workload_id=db),  # its own: kept
        ],
    )
    assert status == 204
    flows = (await api.ok("GET", "/v1/flows"))["flows"]
    assert len(flows) == 1 and flows[0]["dst"]["workload_id"] == db
    assert api.svc.flows.refused == 3
    assert await api.svc.flows.store.losses() == {a.host_id: (0, 3)}


@pytest.mark.parametrize(
    "bad",
    [
        {"records": [rec("-nope", WEB_IP)]},
        {"records": [rec(DB, "not-an-ip")]},
        {"records": [rec(DB, WEB_IP, port=70000)]},
        {"records": [rec(DB, WEB_IP, verdict="dropped")]},
        {"records": [rec(DB, WEB_IP, first_seen=10.0, last_seen=5.0)]},
        {"records": [rec(DB, WEB_IP, last_seen=time.time() + 3600)]},
        {"records": [rec(DB, WEB_IP, connections=-1)]},
        {"records": [rec(DB, WEB_IP, bytes=2**63)]},
        {"records": [rec(DB, WEB_IP, packets=2**64 - 1)]},
        {"records": [rec(DB, WEB_IP, rule_id="r" * 65)]},
        {"records": [rec(DB, WEB_IP, extra=1)]},
        {"records": [], "lost": -1},
        {"records": [], "lost": 294464789374278234537984},  # once a 500 (SQLite overflow)
        {"records": [], "lost": 2**53},
        {"records": [rec(DB, WEB_IP, connections=2**53)]},
        {"records": [rec(DB, WEB_IP)] * 5001},
    ],
)
async def test_a_bad_batch_is_refused_whole(
    api: Admin, make_agent: MakeAgent, bad: dict[str, Any]
) -> None:
    a, _b, _db, _web = await _shop(api, make_agent)
    good = rec(DB, WEB_IP)
    body = {"records": [good, *bad["records"]], "lost": bad.get("lost", 3)}
    status, answer = await a.request("POST", "/v1/agent/flows", body)
    assert status in (400, 413), answer
    assert set(answer) == {"error", "message"}
    assert (await api.ok("GET", "/v1/flows"))["flows"] == []
    assert api.svc.flows.lost == 0


async def test_flow_reports_need_an_agent_signature(api: Admin, make_agent: MakeAgent) -> None:
    await _shop(api, make_agent)
    got, _ = await api.call("POST", "/v1/agent/flows", {"records": [rec(DB, WEB_IP)]})
    assert got == 401
    assert (await api.ok("GET", "/v1/flows"))["flows"] == []


async def test_flow_queries_filter_and_page(api: Admin, make_agent: MakeAgent) -> None:
    a, b, _db, web = await _shop(api, make_agent)
    now = time.time()
    records = [
        rec(
            DB,
            WEB_IP,
            verdict="allowed",
            first_seen=now - 200,
            last_seen=now - 100 + i,
            rule_id="r_x",
        )
        for i in range(5)
    ] + [rec(DB, "192.0.2.1", port=22, last_seen=now - 3000, first_seen=now - 3001)]
    assert (await report(a, records))[0] == 204
    assert (await report(b, [rec(WEB, DB_IP, direction="out", port=80)]))[0] == 204

    async def ids(query: str) -> list[int]:
        out = []
        cursor = ""
        while True:
            q = query + (f"&cursor={cursor}" if cursor else "")
            page = await api.ok("GET", f"/v1/flows?{q}")
            out += [f["id"] for f in page["flows"]]
            if not page["next"]:
                return out
            cursor = page["next"]

    everything = await ids("limit=2")
    assert len(everything) == 7 and len(set(everything)) == 7
    allowed = await ids("verdict=allowed&limit=3")
    assert len(allowed) == 5
    assert len(await ids("src=role=web")) == 6
    assert len(await ids("src=role=web&dst=role=db,app=shop")) == 6
    assert len(await ids("src=role=web&dst=role=db&port=80")) == 1
    assert len(await ids("dst=role=web")) == 0
    assert len(await ids(f"workload={web}")) == 6
    by_web = await ids(f"workload={web}&limit=2")  # either end, a page at a time
    assert by_web == await ids(f"workload={web}") and len(set(by_web)) == 6
    assert len(await ids("port=22")) == 1
    assert len(await ids("rule=r_x")) == 5
    assert len(await ids(f"since={now - 1000}")) == 6
    assert len(await ids(f"until={now - 1000}")) == 1
    # newest first
    page = await api.ok("GET", "/v1/flows?verdict=allowed")
    seen = [f["last_seen"] for f in page["flows"]]
    assert seen == sorted(seen, reverse=True)


@pytest.mark.parametrize(
    "query",
    [
        "verdict=maybe",
        "src=color=red",
        "src=role",
        "port=x",
        "port=70000",
        "since=yesterday",
        "since=nan",
        "since=10&until=5",
        "limit=0",
        "limit=1001",
        "cursor=garbage",
        "port=²",
        "cursor=1.5_99999999999999999999",
        "cursor=inf_1",
        "cursor=nan_1",
        "cursor=1.5_-1",
        "colour=red",
    ],
)
async def test_bad_flow_queries_are_refused(api: Admin, query: str) -> None:
    got, answer = await api.call("GET", f"/v1/flows?{query}")
    assert got == 400, answer
    assert answer["error"] == "invalid_input"


async def test_flow_export_is_json_lines(api: Admin, make_agent: MakeAgent) -> None:
    a, _b, _db, _web = await _shop(api, make_agent)
    assert (await report(a, [rec(DB, WEB_IP, port=p) for p in range(1, 6)]))[0] == 204
    hdrs = {"Authorization": f"Bearer {api.token}"}
    async with api.client.get("/v1/flows/export?port=3", headers=hdrs) as r:
        assert r.status == 200 and r.content_type == "application/x-ndjson"
        lines = (await r.read()).splitlines()
    assert [json.loads(x)["port"] for x in lines] == [3]
    async with api.client.get("/v1/flows/export") as r:
        assert r.status == 401


async def _events(resp: Any, n: int) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    kind = ""
    while len(out) < n:
        line = (await asyncio.wait_for(resp.content.readline(), 5)).decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            out.append((kind, json.loads(line[6:])))
    return out


async def test_flow_stream_sends_new_matching_flows(api: Admin, make_agent: MakeAgent) -> None:
    a, _b, _db, _web = await _shop(api, make_agent)
    hdrs = {"Authorization": f"Bearer {api.token}"}
    async with api.client.get("/v1/flows/stream?verdict=blocked", headers=hdrs) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        assert await asyncio.wait_for(r.content.readline(), 5) == b": segd flows\n"
        assert api.svc.flows.streams == 1
        await report(a, [rec(DB, WEB_IP, verdict="allowed"), rec(DB, "10.0.0.9", port=1)])
        [(kind, flow)] = await _events(r, 1)
        assert kind == "flow" and (flow["src"]["ip"], flow["port"]) == ("10.0.0.9", 1)
    for _ in range(50):
        if api.svc.flows.streams == 0:
            break
        await asyncio.sleep(0.05)
    assert api.svc.flows.streams == 0


async def test_a_stream_whose_client_went_frees_its_place(
    aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    """The handler goes on when its client goes (as in production): the stream
    notices within GONE_CHECK_S, not at its next keepalive."""
    cfg = msgspec.structs.replace(server_cfg, flows=FlowsConfig(max_stream_clients=1))
    api = await start_admin(aiohttp_client, cfg, clock)
    hdrs = {"Authorization": f"Bearer {api.token}"}
    r = await api.client.get("/v1/flows/stream", headers=hdrs)
    assert await asyncio.wait_for(r.content.readline(), 5) == b": segd flows\n"
    r.close()  # `segd ctl flow watch`, interrupted
    for _ in range(int(3 * flowhttp.GONE_CHECK_S / 0.05)):
        if api.svc.flows.streams == 0:
            break
        await asyncio.sleep(0.05)
    assert api.svc.flows.streams == 0
    async with api.client.get("/v1/flows/stream", headers=hdrs) as again:
        assert again.status == 200


async def test_a_quiet_stream_is_kept_open_with_comments(
    api: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flowhttp, "GONE_CHECK_S", 0.05)
    monkeypatch.setattr(flowhttp, "KEEPALIVE_S", 0.2)
    hdrs = {"Authorization": f"Bearer {api.token}"}
    async with api.client.get("/v1/flows/stream", headers=hdrs) as r:
        assert await asyncio.wait_for(r.content.readline(), 5) == b": segd flows\n"
        assert await asyncio.wait_for(r.content.readline(), 5) == b"\n"
        assert await asyncio.wait_for(r.content.readline(), 5) == b": keepalive\n"


async def test_a_slow_stream_is_told_what_it_lost(api: Admin, make_agent: MakeAgent) -> None:
    a, _b, _db, _web = await _shop(api, make_agent)
    sub = api.svc.flows.subscribe(FlowFilter())
    try:
        many = [rec(DB, WEB_IP, port=1 + i % 1000) for i in range(STREAM_QUEUE + 10)]
        assert (await report(a, many))[0] == 204
        assert sub.queue.qsize() == STREAM_QUEUE
        assert sub.take_dropped() == 10
    finally:
        api.svc.flows.unsubscribe(sub)


async def test_flow_retention_and_hourly_rollup(
    api: Admin, make_agent: MakeAgent, clock: Clock
) -> None:
    a, _b, _db, _web = await _shop(api, make_agent)
    now = time.time()
    hour = (now // 3600) * 3600
    old = hour - 2 * 86400  # two days ago: rolled up (default 24 h)
    records = [
        rec(DB, WEB_IP, first_seen=old + i, last_seen=old + 60 + i, packets=1, bytes=10)
        for i in range(4)
    ] + [rec(DB, WEB_IP, first_seen=old + 4000, last_seen=old + 4000)]  # the next hour
    records.append(rec(DB, WEB_IP, first_seen=now - 10 * 86400, last_seen=now - 9 * 86400))
    records.append(rec(DB, WEB_IP))  # recent: left alone
    assert (await report(a, records))[0] == 204
    summed, deleted = await api.svc.flows.housekeep()
    assert deleted == 1  # past 7 days
    assert summed == 6  # 4 + 1 in the two old hours, and the one past retention
    flows = (await api.ok("GET", "/v1/flows"))["flows"]
    assert len(flows) == 3
    [first_hour] = [f for f in flows if old <= f["last_seen"] < old + 3600]
    assert (first_hour["connections"], first_hour["packets"], first_hour["bytes"]) == (12, 4, 40)
    assert (first_hour["first_seen"], first_hour["last_seen"]) == (old, old + 63)


async def test_counts_up_to_the_bound_are_kept_and_rolled_up_without_overflow(
    api: Admin, make_agent: MakeAgent
) -> None:
    """Counts up to 2**53 - 1 are taken; what they add up to is held there (an
    hourly rollup would otherwise fail on SQLite's integer overflow)."""
    a, _b, _db, _web = await _shop(api, make_agent)
    top = wire.MAX_COUNT
    old = (time.time() // 3600) * 3600 - 2 * 86400
    big = [
        rec(DB, WEB_IP, first_seen=old + i, last_seen=old + i, connections=top, bytes=top)
        for i in range(1100)  # their exact sum is past 2**63
    ]
    assert (await report(a, big, lost=top))[0] == 204
    assert (await report(a, [], lost=top))[0] == 204
    summed, _ = await api.svc.flows.housekeep()
    assert summed == 1100
    [rolled] = (await api.ok("GET", "/v1/flows"))["flows"]
    assert (rolled["connections"], rolled["bytes"], rolled["packets"]) == (top, top, 0)
    assert (await api.svc.flows.store.losses())[a.host_id][0] == top


async def _paced(
    aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock, rate: int
) -> tuple[Admin, Agent]:
    """A server taking `rate` flow records a second, the shop on it: (admin, host a)."""
    cfg = msgspec.structs.replace(server_cfg, flows=FlowsConfig(max_records_per_s=rate))
    api = await start_admin(aiohttp_client, cfg, clock)
    a, _b, _db, _web = await _shop(api, lambda name: register_agent(api, clock, name))
    return api, a


async def test_flow_reports_beyond_the_pace_are_answered_busy(
    aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    api, a = await _paced(aiohttp_client, server_cfg, clock, 10)
    # the bucket holds one full batch, however low the pace
    assert (await report(a, [rec(DB, WEB_IP)] * wire.MAX_FLOW_BATCH))[0] == 204
    status, answer = await report(a, [rec(DB, WEB_IP)] * 200, lost=4)  # 20 s away
    assert (status, answer["error"]) == (503, "busy")
    assert api.svc.flows.ingested == wire.MAX_FLOW_BATCH
    assert (api.svc.flows.deferred, api.svc.flows.lost) == (1, 0)


async def test_a_full_batch_gets_its_turn_at_the_lowest_pace(
    aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    """At 12 s of records or less a second, a full batch fits no 2 s bucket and no
    10 s wait: the bucket holds one full batch instead."""
    api, a = await _paced(aiohttp_client, server_cfg, clock, 1)
    records = [rec(DB, WEB_IP, port=1 + i % 60_000) for i in range(wire.MAX_FLOW_BATCH)]
    assert (await report(a, records))[0] == 204
    assert api.svc.flows.ingested == wire.MAX_FLOW_BATCH


async def test_pairings_being_answered_go_before_flow_ingest(
    api: Admin, make_agent: MakeAgent
) -> None:
    a, _b, _db, _web = await _shop(api, make_agent)
    pairing = api.svc.pairings.one()
    pairing.__enter__()  # a pairing being answered
    try:
        sent = asyncio.create_task(report(a, [rec(DB, WEB_IP)]))
        pacer = api.svc.flows._pacer
        assert pacer is not None
        for _ in range(200):  # until the batch is in (the pacer booked it)
            if pacer._tokens < pacer.burst:
                break
            await asyncio.sleep(0.001)
        assert pacer._tokens < pacer.burst
        for _ in range(20):  # well within PAIRING_FIRST_S
            await asyncio.sleep(0.001)
        assert not sent.done() and api.svc.flows.ingested == 0
    finally:
        pairing.__exit__(None, None, None)
    assert (await sent)[0] == 204
    assert api.svc.flows.ingested == 1


async def test_a_batch_sent_again_under_its_name_is_kept_once(
    api: Admin, make_agent: MakeAgent
) -> None:
    """The agent gave up waiting while the server kept its batch, and sends it
    again: the same name, answered 204, kept (and its losses counted) once."""
    a, b, _db, _web = await _shop(api, make_agent)
    body = {"records": [rec(DB, WEB_IP, port=p) for p in (1, 2, 3)], "lost": 4}
    named = {**body, "batch_id": "b-0123456789abcdef"}
    for _ in range(2):
        status, _ = await a.request("POST", "/v1/agent/flows", named)
        assert status == 204
    assert len((await api.ok("GET", "/v1/flows"))["flows"]) == 3
    assert (api.svc.flows.ingested, api.svc.flows.lost, api.svc.flows.repeated) == (3, 4, 1)
    # a name is the host's own: another host's batch of that name is kept
    theirs = {"records": [rec(WEB, DB_IP, direction="out")], "batch_id": named["batch_id"]}
    assert (await b.request("POST", "/v1/agent/flows", theirs))[0] == 204
    assert api.svc.flows.ingested == 4
    # a batch with no name (an older agent) is kept each time
    assert (await a.request("POST", "/v1/agent/flows", body))[0] == 204
    assert (await a.request("POST", "/v1/agent/flows", body))[0] == 204
    assert len((await api.ok("GET", "/v1/flows"))["flows"]) == 10
    bad = {**body, "batch_id": "not/a name"}
    status, answer = await a.request("POST", "/v1/agent/flows", bad)
    assert (status, answer["error"]) == (400, "invalid_input")


async def test_a_batch_from_a_host_revoked_while_it_waited_is_refused(
    aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    api, a = await _paced(aiohttp_client, server_cfg, clock, 10)
    assert (await report(a, [rec(DB, WEB_IP)] * wire.MAX_FLOW_BATCH))[0] == 204  # the bucket
    late = asyncio.create_task(report(a, [rec(DB, WEB_IP, port=1)] * 5))  # waits 0.5 s
    for _ in range(100):  # until the batch is booked and waiting its turn
        if api.svc.flows._waiting:
            break
        await asyncio.sleep(0.01)
    assert api.svc.flows._waiting == 1
    await api.ok("POST", f"/v1/hosts/{a.host_id}/revoke")
    status, answer = await late
    assert (status, answer["error"]) == (403, "host_revoked")
    assert api.svc.flows.ingested == wire.MAX_FLOW_BATCH


async def test_an_hour_is_summed_into_one_row_once_it_is_all_past_the_age(
    api: Admin, make_agent: MakeAgent, clock: Clock
) -> None:
    """Housekeeping runs hourly, its cutoff anywhere in an hour: an hour is summed
    only when all of it is older than the cutoff, so once."""
    a, _b, _db, _web = await _shop(api, make_agent)
    hour = (time.time() // 3600) * 3600 - 2 * 86400
    same = {"first_seen": hour + 600, "packets": 1, "bytes": 10}
    early = rec(DB, WEB_IP, last_seen=hour + 600, **same)
    late = rec(DB, WEB_IP, last_seen=hour + 3000, **same)
    assert (await report(a, [early, late]))[0] == 204
    clock.offset = (hour + 1800 + 86400) - time.time()  # the cutoff: half past that hour
    assert await api.svc.flows.housekeep() == (0, 0)  # not all of it is past
    clock.offset += 3600  # the next hourly run
    assert await api.svc.flows.housekeep() == (2, 0)
    clock.offset = 0
    (f,) = (await api.ok("GET", "/v1/flows"))["flows"]
    assert (f["connections"], f["packets"], f["first_seen"], f["last_seen"]) == (
        6,
        2,
        hour + 600,
        hour + 3000,
    )


async def test_a_bad_batch_is_refused_and_gives_its_turn_back(
    aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    api, a = await _paced(aiohttp_client, server_cfg, clock, 10)
    pacer = api.svc.flows._pacer
    assert pacer is not None
    bad = [rec(DB, WEB_IP)] * 100 + [rec(DB, WEB_IP, first_seen=-1)]
    status, answer = await report(a, bad)
    assert (status, answer["error"]) == (400, "invalid_input")
    assert pacer._tokens == pacer.burst  # the whole bucket is still there
    assert (await report(a, [rec(DB, WEB_IP)] * wire.MAX_FLOW_BATCH))[0] == 204


async def test_a_stream_ended_by_a_stopping_server_counts_the_flow_it_lost(
    api: Admin, make_agent: MakeAgent
) -> None:
    """Flows.close makes room for the end in a full queue: that flow is counted."""
    a, _b, _db, _web = await _shop(api, make_agent)
    sub = api.svc.flows.subscribe(FlowFilter())
    try:
        many = [rec(DB, WEB_IP, port=1 + i % 1000) for i in range(STREAM_QUEUE)]
        assert (await report(a, many))[0] == 204
        assert sub.queue.full() and sub.dropped == 0
        api.svc.flows.close()
        assert sub.dropped == 1
    finally:
        api.svc.flows.unsubscribe(sub)
