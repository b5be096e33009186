"""Signed agent requests: taken at most once, also across a server restart, and
stamped at most `request_future_skew_s` ahead of the server clock."""

from __future__ import annotations

import json
from typing import Any

from segd.config import ServerConfig
from tests.api.conftest import (
    Admin,
    Agent,
    AiohttpClient,
    Clock,
    MakeAgent,
    register_agent,
    start_admin,
)

UNPAIR = "/v1/agent/unpair"


async def _send(agent: Agent, path: str, data: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with agent.client.post(path, data=data, headers=headers) as r:
        raw = await r.read()
        return r.status, (json.loads(raw) if raw else None)


async def test_a_request_signed_before_a_restart_is_refused_after_it(
    api: Admin,
    make_agent: MakeAgent,
    aiohttp_client: AiohttpClient,
    server_cfg: ServerConfig,
    clock: Clock,
) -> None:
    """A signed unpair stamped ahead of the server clock, taken once and refused as a
    replay, used to be taken again after a restart (the nonce cache was empty and
    the stamp was after the new process started)."""
    token = await api.setup_policy()
    a = await make_agent()
    assert (await a.pair("c1", token, ["10.0.0.1"]))[0] == 200
    body = json.dumps({"container_id": "c1"}).encode()

    # 50 s ahead: beyond the future skew (5 s by default).
    far = a.sign("POST", UNPAIR, body, at=clock() + 50)
    status, answer = await _send(a, UNPAIR, body, far)
    assert (status, answer["error"]) == (401, "stale_request")
    assert len(await api.ok("GET", "/v1/workloads")) == 1

    # Within the skew: taken once, then refused as a replay.
    ahead = clock() + 4
    captured = a.sign("POST", UNPAIR, body, at=ahead)
    assert (await _send(a, UNPAIR, body, captured))[0] == 204
    status, answer = await _send(a, UNPAIR, body, captured)
    assert (status, answer["error"]) == (401, "replayed_request")
    assert (await a.pair("c1", token, ["10.0.0.1"]))[0] == 200

    await api.client.close()
    api2 = await start_admin(aiohttp_client, server_cfg, clock)
    a.client = api2.client
    # The stamp is after the new start and within the skew: only the mark refuses it.
    assert api2.svc.started_at < ahead < clock() + server_cfg.request_future_skew_s
    status, answer = await _send(a, UNPAIR, body, captured)
    assert (status, answer["error"]) == (401, "stale_request")
    assert len(await api2.ok("GET", "/v1/workloads")) == 1
    # The agent (whose clock is 4 s fast) goes on with its next requests.
    path = "/v1/agent/instructions?since=0"
    assert (await a.request("GET", path, headers=a.sign("GET", path, at=clock() + 4)))[0] == 200


async def test_an_agent_with_a_fast_clock_keeps_working_across_restarts(
    api: Admin,
    make_agent: MakeAgent,
    aiohttp_client: AiohttpClient,
    server_cfg: ServerConfig,
    clock: Clock,
) -> None:
    token = await api.setup_policy()
    a = await make_agent()
    fast = Clock()
    fast.offset = clock.offset + 3  # 3 s ahead of the server
    a.clock = fast
    assert (await a.pair("c1", token, ["10.0.0.1"]))[0] == 200
    for _ in range(2):
        await api.client.close()
        api = await start_admin(aiohttp_client, server_cfg, clock)
        a.client = api.client
        assert (await a.request("GET", "/v1/agent/instructions?since=0"))[0] == 200
        assert (await a.pair("c1", token, ["10.0.0.1"]))[0] == 200
        assert (await a.unpair("c1"))[0] == 204
        assert (await a.pair("c1", token, ["10.0.0.1"]))[0] == 200


async def test_an_agent_in_sync_writes_no_replay_mark(
    api: Admin, make_agent: MakeAgent, clock: Clock
) -> None:
    token = await api.setup_policy(max_uses=20)
    a = await make_agent()
    for i in range(20):
        assert (await a.pair(f"c{i}", token, [f"10.0.0.{i + 1}"]))[0] == 200
        assert (await a.request("GET", "/v1/agent/instructions?since=0"))[0] == 200
    assert await api.svc.store.replay_marks() == {}
    ahead = a.sign("GET", "/v1/agent/instructions?since=0", at=clock() + 2)
    assert (await a.request("GET", "/v1/agent/instructions?since=0", headers=ahead))[0] == 200
    marks = await api.svc.store.replay_marks()
    assert list(marks) == [a.host_id]


async def test_the_future_skew_is_configurable(
    aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    cfg = ServerConfig(data_dir=server_cfg.data_dir, request_future_skew_s=0)
    api = await start_admin(aiohttp_client, cfg, clock)
    a = await register_agent(api, clock)
    path = "/v1/agent/instructions?since=0"
    status, body = await a.request("GET", path, headers=a.sign("GET", path, at=clock() + 1))
    assert (status, body["error"]) == (401, "stale_request")
    assert (await a.request("GET", path))[0] == 200
