"""Requests without credentials, or with refused ones: rate-limited per source, and
summed up in the audit instead of one durable row (and one log line) each."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import nacl.signing
import pytest

from segd import crypto
from segd.config import ServerConfig
from segd.server import guard
from tests.api.conftest import Admin, Agent, AiohttpClient, Clock, start_admin


def _register_body(code: str = "act_not-a-code", hostname: str = "h1") -> dict[str, str]:
    key = nacl.signing.SigningKey.generate()
    return {
        "activation_code": code,
        "public_key": crypto.b64e(bytes(key.verify_key)),
        "hostname": hostname,
    }


async def _post(api: Admin, path: str, body: Any) -> tuple[int, dict[str, str], Any]:
    async with api.client.post(path, json=body) as r:
        return r.status, dict(r.headers), await r.json()


async def _audit(api: Admin) -> list[dict[str, Any]]:
    return list(await api.ok("GET", "/v1/audit?limit=1000"))


async def test_a_register_flood_writes_a_handful_of_audit_rows(
    api: Admin, clock: Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each refused registration used to write one audit row and one warning line."""
    before = len(await _audit(api))
    capsys.readouterr()
    answers = await asyncio.gather(
        *(_post(api, "/v1/agent/register", _register_body(hostname=f"h{i}")) for i in range(300))
    )
    statuses = Counter(status for status, _, _ in answers)
    refused, limited = statuses.pop(401), statuses.pop(429)
    assert statuses == {} and refused >= 100 and limited >= 150  # the default burst, then 10/s
    clock.advance(guard.SUMMARY_WINDOW_S)
    assert await api.svc.guard.flush(api.svc.store, clock()) == 1
    rows = (await _audit(api))[before:]
    assert [(r["event"], r["result"], r["reason"]) for r in rows] == [
        ("host.registered", "denied", "invalid_activation_code"),
        ("requests.refused", "denied", "rate_limited"),
    ]
    detail = rows[1]["detail"]
    assert "299 refused from 127.0.0.1" in detail
    assert f"invalid_activation_code {refused - 1}, rate_limited {limited}" in detail
    assert "last: " in detail
    logged = capsys.readouterr().out
    assert logged.count("host.register_refused") == 1
    assert logged.count("requests.refused") == 1


async def test_register_beyond_the_limit_is_429_with_retry_after(
    aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    cfg = ServerConfig(data_dir=server_cfg.data_dir, rate_limit_per_s=0.5, rate_limit_burst=3)
    api = await start_admin(aiohttp_client, cfg, clock)
    answers = [await _post(api, "/v1/agent/register", _register_body()) for _ in range(4)]
    assert [s for s, _, _ in answers] == [401, 401, 401, 429]
    _, headers, body = answers[3]
    assert set(body) == {"error", "message"} and body["error"] == "rate_limited"
    assert headers["Retry-After"] == "2"  # one token at 0.5/s
    assert (await api.call("GET", "/v1/health"))[0] == 429  # every route without credentials
    # An admin with a good token is never limited, from the same address.
    code = (await api.ok("POST", "/v1/activation-codes", {}, status=201))["code"]
    clock.advance(2)
    status, _, reg = await _post(api, "/v1/agent/register", _register_body(code))
    assert status == 201 and reg["host_id"]


async def test_refused_admin_tokens_are_limited_and_good_ones_never(
    aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    cfg = ServerConfig(data_dir=server_cfg.data_dir, rate_limit_per_s=0.1, rate_limit_burst=5)
    api = await start_admin(aiohttp_client, cfg, clock)
    before = await _audit(api)
    guesses = [api.call("GET", "/v1/rules", token="segd_guess") for _ in range(8)]
    statuses = sorted(s for s, _ in await asyncio.gather(*guesses))
    assert statuses == [401] * 5 + [429] * 3
    for _ in range(20):
        assert (await api.call("GET", "/v1/rules"))[0] == 200
    assert await _audit(api) == before  # nothing audited one by one
    await api.svc.guard.flush(api.svc.store, clock(), everything=True)
    [summary] = (await _audit(api))[len(before) :]
    assert summary["event"] == "requests.refused"
    assert summary["detail"].endswith("last: GET /v1/rules (admin token)")
    assert "segd_guess" not in summary["detail"]
    assert "rate_limited 3, unauthorized 5" in summary["detail"]


async def test_refused_agent_signatures_are_limited_and_good_ones_never(
    aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    cfg = ServerConfig(data_dir=server_cfg.data_dir, rate_limit_per_s=0.1, rate_limit_burst=5)
    api = await start_admin(aiohttp_client, cfg, clock)
    code = (await api.ok("POST", "/v1/activation-codes", {}, status=201))["code"]
    key = nacl.signing.SigningKey.generate()
    body = _register_body(code)
    body["public_key"] = crypto.b64e(bytes(key.verify_key))
    status, _, reg = await _post(api, "/v1/agent/register", body)
    assert status == 201
    agent = Agent(api.client, reg["host_id"], key, clock, reg["server_keys"])
    forger = Agent(api.client, reg["host_id"], nacl.signing.SigningKey.generate(), clock, {})
    path = "/v1/agent/instructions?since=0"
    forged = await asyncio.gather(*(forger.request("GET", path) for _ in range(7)))
    assert sorted(s for s, _ in forged) == [401] * 4 + [429] * 3  # registering took one
    for _ in range(10):
        assert (await agent.request("GET", path))[0] == 200


async def test_attacker_chosen_text_is_clipped_in_the_audit_and_the_log(
    api: Admin, clock: Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    hostname = "h" * 253  # the longest hostname the server takes
    status, _, _ = await _post(api, "/v1/agent/register", _register_body(hostname=hostname))
    assert status == 401
    await _post(api, "/v1/agent/register", _register_body(hostname=hostname))
    await api.svc.guard.flush(api.svc.store, clock(), everything=True)
    rows = [e for e in await _audit(api) if e["result"] == "denied"]
    assert len(rows) == 2
    assert all(hostname not in e["detail"] and len(e["detail"]) < 200 for e in rows)
    assert hostname not in capsys.readouterr().out


async def test_refusal_summaries_are_written_at_shutdown(
    aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    api = await start_admin(aiohttp_client, server_cfg, clock)
    for _ in range(3):
        await _post(api, "/v1/agent/register", _register_body())
    await api.client.close()  # the app's cleanup writes what is pending
    api2 = await start_admin(aiohttp_client, server_cfg, clock)
    rows = [e for e in await _audit(api2) if e["result"] == "denied"]
    assert [e["event"] for e in rows] == ["host.registered", "requests.refused"]
    assert json.dumps(rows[1]).count("invalid_activation_code 2") == 1
