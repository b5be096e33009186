"""Concurrent pairings against one key: exactly max_uses succeed."""

from __future__ import annotations

import asyncio
from collections import Counter

from tests.api.conftest import Admin, MakeAgent


async def test_fifty_concurrent_pairings_against_seven_uses(
    api: Admin, make_agent: MakeAgent
) -> None:
    token = await api.setup_policy(max_uses=7)
    agents = [await make_agent(f"h{i}") for i in range(5)]
    results = await asyncio.gather(
        *(agents[i % 5].pair(f"c{i}", token, [f"10.1.0.{i + 1}"]) for i in range(50))
    )
    outcome = Counter("ok" if status == 200 else body["error"] for status, body in results)
    assert outcome == {"ok": 7, "key_exhausted": 43}
    [key] = await api.ok("GET", "/v1/keys")
    assert key["uses"] == 7
    assert len(await api.ok("GET", "/v1/workloads")) == 7
    paired = [
        e for e in await api.ok("GET", "/v1/audit?limit=1000") if e["event"] == "workload.paired"
    ]
    assert Counter(e["result"] for e in paired) == {"ok": 7, "denied": 43}
