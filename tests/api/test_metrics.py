"""`GET /metrics`: Prometheus text the official parser reads, admin token or loopback."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from segd.errors import Unauthorized
from segd.server.api import ROUTES, RUNTIME, authenticate
from tests.api.conftest import Admin, MakeAgent


async def scrape(
    api: Admin, **headers: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with api.client.get("/metrics", headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await r.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_what_the_server_does(api: Admin, make_agent: MakeAgent) -> None:
    token = await api.setup_policy(profile="db", labels={"role": "db"})
    a = await make_agent("host-a")
    b = await make_agent("host-b")
    assert (await a.pair("c" * 64, token, ["10.0.0.2"]))[0] == 200
    assert (await a.pair("d" * 64, "segd1.bogus", ["10.0.0.3"]))[0] in (400, 401, 403)
    await api.ok("POST", f"/v1/hosts/{b.host_id}/revoke")
    now = time.time()
    record: dict[str, Any] = {
        "container_id": "c" * 64,
        "direction": "in",
        "peer_ip": "192.0.2.1",
        "proto": "tcp",
        "port": 22,
        "verdict": "blocked",
        "connections": 1,
        "first_seen": now - 1,
        "last_seen": now,
    }
    status, _ = await a.request("POST", "/v1/agent/flows", {"records": [record] * 3, "lost": 5})
    assert status == 204
    poll = asyncio.create_task(a.instructions(since=10**9, wait=3))
    for _ in range(100):
        if api.svc.hub.waiting:
            break
        await asyncio.sleep(0.01)
    m = await scrape(api)  # from loopback: no token needed
    poll.cancel()
    assert m[("segd_pairings_total", (("reason", ""), ("result", "ok")))] == 1
    denied = [k for k in m if k[0] == "segd_pairings_total" and ("result", "denied") in k[1]]
    assert len(denied) == 1 and m[denied[0]] == 1
    assert m[("segd_workloads", ())] == 1
    assert m[("segd_hosts", (("state", "active"),))] == 1
    assert m[("segd_hosts", (("state", "revoked"),))] == 1
    assert m[("segd_longpoll_waiters", ())] == 1
    assert m[("segd_compile_seconds_count", ())] >= 3
    assert m[("segd_instruction_pushes_total", ())] >= 2
    assert m[("segd_flow_records_ingested_total", ())] == 3
    assert m[("segd_flow_records_lost_total", ())] == 5
    assert m[("segd_flow_records_refused_total", ())] == 0
    # with the admin token, too; a wrong token is refused even from loopback
    await scrape(api, Authorization=f"Bearer {api.token}")
    async with api.client.get("/metrics", headers={"Authorization": "Bearer nope"}) as r:
        assert r.status == 401


@pytest.mark.parametrize(
    ("peer", "token", "allowed"),
    [
        ("127.0.0.1", None, True),
        ("::1", None, True),
        ("192.0.2.10", None, False),
        ("192.0.2.10", "good", True),
        ("192.0.2.10", "bad", False),
    ],
)
async def test_metrics_need_the_token_unless_from_loopback(
    api: Admin, peer: str, token: str | None, allowed: bool
) -> None:
    [route] = [r for r in ROUTES if r.path == "/metrics"]
    headers = {}
    if token:
        headers["Authorization"] = f"Bearer {api.token if token == 'good' else 'x' * 20}"
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda k, d=None: (peer, 1234) if k == "peername" else d
    req = make_mocked_request("GET", "/metrics", headers=headers, transport=transport, app=api.app)
    assert req.remote == peer
    rt = api.app[RUNTIME]
    assert rt.svc is not None
    if allowed:
        await authenticate(req, route, mock.Mock())
    else:
        with pytest.raises(Unauthorized):
            await authenticate(req, route, mock.Mock())
