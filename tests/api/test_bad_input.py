"""Bad input on every endpoint: a clear 4xx with {error, message}, and nothing written."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.api.conftest import Admin, Agent, MakeAgent

BIG = b'{"description": "' + b"x" * 70_000 + b'"}'
RULE = {"providers": "any", "consumers": "any", "services": ["tcp/80"]}
PROFILE = {"name": "p", "labels": {"role": "web"}}
PAIR = {"container_id": "c9", "pairing_key": "segd1.a.b", "ips": ["10.9.9.9"]}


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


# (who, method, path, body: bytes | object, status, error code)
# fmt: off
CASES: list[tuple[str, str, str, Any, int, str]] = [
    # rules
    ("admin", "POST", "/v1/rules", b"{", 400, "malformed_json"),
    ("admin", "POST", "/v1/rules", b"[]", 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", b"", 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, colour="red"), 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, providers=5), 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, services="tcp/80"), 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, providers=[{"role": "d b"}]), 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, consumers=[{"colour": "x"}]), 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, providers=[]), 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, providers="all"), 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, services=[]), 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, services=[f"tcp/{p}" for p in range(1, 66)]), 400,
     "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, services=["tcp/0"]), 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, services=["sctp/9"]), 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, services=["tcp/9-1"]), 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, options=["fast"]), 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, description="a\x00b"), 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, description="a\u202eb"), 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", with_(RULE, description="a\x7fb"), 400, "invalid_input"),
    ("admin", "POST", "/v1/rules", BIG, 413, "body_too_large"),
    # profiles
    ("admin", "POST", "/v1/profiles", b"{'name': 1}", 400, "malformed_json"),
    ("admin", "POST", "/v1/profiles", with_(PROFILE, lock=["role"]), 400, "invalid_input"),
    ("admin", "POST", "/v1/profiles", with_(PROFILE, max_uses="3"), 400, "invalid_input"),
    ("admin", "POST", "/v1/profiles", with_(PROFILE, max_uses=0), 400, "invalid_input"),
    ("admin", "POST", "/v1/profiles", with_(PROFILE, max_uses=10**7), 400, "invalid_input"),
    ("admin", "POST", "/v1/profiles", with_(PROFILE, lifespan_s=0), 400, "invalid_input"),
    ("admin", "POST", "/v1/profiles", with_(PROFILE, lifespan_s=10 * 366 * 86400 + 1), 400,
     "invalid_input"),
    ("admin", "POST", "/v1/profiles", with_(PROFILE, max_uses=10**6 + 1), 400, "invalid_input"),
    ("admin", "POST", "/v1/profiles", with_(PROFILE, on_mismatch="maybe"), 400, "invalid_input"),
    ("admin", "POST", "/v1/profiles", with_(PROFILE, enabled="yes"), 400, "invalid_input"),
    ("admin", "POST", "/v1/profiles", with_(PROFILE, labels={"role": ""}), 400, "invalid_input"),
    ("admin", "POST", "/v1/profiles", with_(PROFILE, labels={"role": "a/b"}), 400,
     "invalid_input"),
    ("admin", "POST", "/v1/profiles", with_(PROFILE, labels={"role": 7}), 400, "invalid_input"),
    ("admin", "POST", "/v1/profiles", with_(PROFILE, locked=["app"]), 400, "invalid_input"),
    ("admin", "POST", "/v1/profiles", with_(PROFILE, name="two words"), 400, "invalid_input"),
    ("admin", "POST", "/v1/profiles", with_(PROFILE, description="x" * 501), 400,
     "invalid_input"),
    ("admin", "POST", "/v1/profiles", BIG, 413, "body_too_large"),
    # keys
    ("admin", "POST", "/v1/keys", b"not json", 400, "malformed_json"),
    ("admin", "POST", "/v1/keys", {"profile": "db", "uses": 2}, 400, "invalid_input"),
    ("admin", "POST", "/v1/keys", {"profile": 1}, 400, "invalid_input"),
    ("admin", "POST", "/v1/keys", {"profile": "db", "max_uses": 0}, 400, "invalid_input"),
    ("admin", "POST", "/v1/keys", {"profile": "db", "lifespan_s": -5}, 400, "invalid_input"),
    ("admin", "POST", "/v1/keys", {"profile": "db", "lifespan_s": 10 * 366 * 86400 + 1}, 400,
     "invalid_input"),
    ("admin", "POST", "/v1/keys", {"profile": "db", "max_uses": 10**6 + 1}, 400, "invalid_input"),
    ("admin", "POST", "/v1/keys", {"profile": "db", "max_uses": 1.5}, 400, "invalid_input"),
    ("admin", "POST", "/v1/keys", {"profile": "nope"}, 404, "not_found"),
    ("admin", "POST", "/v1/keys", BIG, 413, "body_too_large"),
    ("admin", "POST", "/v1/keys", {"profile": "db", "max_uses": "unlimited"}, 400,
     "invalid_input"),
    ("admin", "POST", "/v1/keys/nope/revoke", None, 404, "not_found"),
    ("admin", "POST", "/v1/keys/nope/revoke", {"unpair": True}, 404, "not_found"),
    ("admin", "POST", "/v1/keys/nope/revoke", {"unpair": "yes"}, 400, "invalid_input"),
    ("admin", "POST", "/v1/keys/nope/revoke", {"unpair": True, "all": 1}, 400, "invalid_input"),
    ("admin", "POST", "/v1/profiles/nope/revoke", {"unpair": True}, 404, "not_found"),
    ("admin", "POST", "/v1/profiles/nope/revoke", {"unpair": 1}, 400, "invalid_input"),
    ("admin", "DELETE", "/v1/workloads/nope", None, 404, "not_found"),
    ("admin", "DELETE", "/v1/workloads/w_0123456789abcdef", None, 404, "not_found"),
    ("admin", "GET", "/v1/keys?profile=nope", None, 404, "not_found"),
    # activation codes, hosts, audit, routing
    ("admin", "POST", "/v1/activation-codes", b"{", 400, "malformed_json"),
    ("admin", "POST", "/v1/activation-codes", {"lifespan": 5}, 400, "invalid_input"),
    ("admin", "POST", "/v1/activation-codes", {"lifespan_s": "5"}, 400, "invalid_input"),
    ("admin", "POST", "/v1/activation-codes", {"lifespan_s": 0}, 400, "invalid_input"),
    ("admin", "POST", "/v1/activation-codes", {"lifespan_s": 30 * 86400 + 1}, 400,
     "invalid_input"),
    ("admin", "POST", "/v1/activation-codes", BIG, 413, "body_too_large"),
    ("admin", "POST", "/v1/hosts/nope/revoke", None, 404, "not_found"),
    ("admin", "DELETE", "/v1/rules/nope", None, 404, "not_found"),
    ("admin", "DELETE", "/v1/profiles/nope", None, 404, "not_found"),
    ("admin", "GET", "/v1/audit?limit=abc", None, 400, "invalid_input"),
    ("admin", "GET", "/v1/audit?limit=0", None, 400, "invalid_input"),
    ("admin", "GET", "/v1/audit?after=-1", None, 400, "invalid_input"),
    ("admin", "GET", "/v1/nothing", None, 404, "not_found"),
    ("admin", "PUT", "/v1/rules", RULE, 405, "method_not_allowed"),
    # agent registration (no signature, only the code)
    ("none", "POST", "/v1/agent/register", b"{", 400, "malformed_json"),
    ("none", "POST", "/v1/agent/register",
     {"activation_code": "x", "public_key": "x", "hostname": "h", "admin": True}, 400,
     "invalid_input"),
    ("none", "POST", "/v1/agent/register",
     {"activation_code": "x", "public_key": 1, "hostname": "h"}, 400, "invalid_input"),
    ("none", "POST", "/v1/agent/register",
     {"activation_code": "x", "public_key": "AAAA", "hostname": "h"}, 400, "invalid_input"),
    ("none", "POST", "/v1/agent/register",
     {"activation_code": "x", "public_key": "A" * 43, "hostname": "bad host"}, 400,
     "invalid_input"),
    ("none", "POST", "/v1/agent/register",
     {"activation_code": "wrong", "public_key": "A" * 43, "hostname": "h"}, 401,
     "invalid_activation_code"),
    ("none", "POST", "/v1/agent/register", BIG, 413, "body_too_large"),
    # signed agent requests
    ("agent", "POST", "/v1/agent/pair", b"{", 400, "malformed_json"),
    ("agent", "POST", "/v1/agent/pair", with_(PAIR, labels={}), 400, "invalid_input"),
    ("agent", "POST", "/v1/agent/pair", with_(PAIR, ips="10.0.0.1"), 400, "invalid_input"),
    ("agent", "POST", "/v1/agent/pair", with_(PAIR, ips=["10.0.0.300"]), 400, "invalid_input"),
    ("agent", "POST", "/v1/agent/pair", with_(PAIR, ips=["127.0.0.1"]), 400, "invalid_input"),
    ("agent", "POST", "/v1/agent/pair", with_(PAIR, ips=[f"10.0.0.{i}" for i in range(1, 18)]),
     400, "invalid_input"),
    ("agent", "POST", "/v1/agent/pair", with_(PAIR, pairing_key="segd1." + "a" * 4091), 400,
     "invalid_input"),
    ("agent", "POST", "/v1/agent/pair", with_(PAIR, container_id="../x"), 400, "invalid_input"),
    ("agent", "POST", "/v1/agent/pair", with_(PAIR, requested_labels={"role": 1}), 400,
     "invalid_input"),
    ("agent", "POST", "/v1/agent/pair", BIG, 413, "body_too_large"),
    # agent text an admin's terminal shows: no DEL, C1 controls or bidi overrides
    ("agent", "POST", "/v1/agent/pair", with_(PAIR, name="web\u202egnp.exe"), 400,
     "invalid_input"),
    ("agent", "POST", "/v1/agent/pair", with_(PAIR, name="a\u2066b\u2069"), 400,
     "invalid_input"),
    ("agent", "POST", "/v1/agent/pair", with_(PAIR, name="a\x7fb"), 400, "invalid_input"),
    ("agent", "POST", "/v1/agent/pair", with_(PAIR, name="a\x9b2Jb"), 400, "invalid_input"),
    ("agent", "POST", "/v1/agent/report", {"event": "tamper", "detail": "ok\u202e"}, 400,
     "invalid_input"),
    ("agent", "POST", "/v1/agent/report", {"event": "tamper", "detail": "\x9b2J"}, 400,
     "invalid_input"),
    ("agent", "POST", "/v1/agent/report", {"event": "tamper", "detail": "a\x7f"}, 400,
     "invalid_input"),
    ("agent", "POST", "/v1/agent/unpair", b"{", 400, "malformed_json"),
    ("agent", "POST", "/v1/agent/unpair", {"container_id": "c", "force": 1}, 400,
     "invalid_input"),
    ("agent", "POST", "/v1/agent/unpair", {"container_id": 5}, 400, "invalid_input"),
    ("agent", "POST", "/v1/agent/unpair", {"container_id": "a b"}, 400, "invalid_input"),
    ("agent", "POST", "/v1/agent/report", b"{", 400, "malformed_json"),
    ("agent", "POST", "/v1/agent/report", {"event": "tamper", "x": 1}, 400, "invalid_input"),
    ("agent", "POST", "/v1/agent/report", {"event": 3}, 400, "invalid_input"),
    ("agent", "POST", "/v1/agent/report", {"event": "Tamper!"}, 400, "invalid_input"),
    ("agent", "GET", "/v1/agent/instructions?since=abc", None, 400, "invalid_input"),
    ("agent", "GET", "/v1/agent/instructions?since=-1", None, 400, "invalid_input"),
    ("agent", "GET", "/v1/agent/instructions?wait=-1", None, 400, "invalid_input"),
    ("agent", "GET", "/v1/agent/instructions?wait=nan", None, 400, "invalid_input"),
]
# fmt: on


async def _send(
    api: Admin, agent: Agent, who: str, method: str, path: str, body: Any
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
    if who == "agent":
        return await agent.raw(method, path, data)
    token = api.token if who == "admin" else ""
    return await api.call(method, path, data=data, token=token)


@pytest.mark.parametrize(("who", "method", "path", "body", "status", "code"), CASES)
async def test_bad_input_is_a_clear_4xx_and_writes_nothing(
    api: Admin,
    make_agent: MakeAgent,
    who: str,
    method: str,
    path: str,
    body: Any,
    status: int,
    code: str,
) -> None:
    await api.setup_policy()
    agent = await make_agent()
    before = await api.snapshot()
    audit_before = await api.ok("GET", "/v1/audit?limit=1000")
    got, answer = await _send(api, agent, who, method, path, body)
    assert (got, answer["error"] if answer else None) == (status, code), answer
    assert set(answer) == {"error", "message"} and answer["message"]
    assert await api.snapshot() == before
    audit_after = await api.ok("GET", "/v1/audit?limit=1000")
    if code != "invalid_activation_code":  # a refused registration is audited
        assert audit_after == audit_before


@pytest.mark.parametrize(
    "labels",
    [{"role": "a b"}, {"colour": "red"}, {"env": ""}, {"env": "x" * 64}],
)
async def test_pair_with_invalid_label_values_is_refused_and_audited(
    api: Admin, make_agent: MakeAgent, labels: dict[str, str]
) -> None:
    token = await api.setup_policy()
    agent = await make_agent()
    before = await api.snapshot()
    status, body = await agent.pair("c1", token, ["10.0.0.1"], labels)
    assert (status, body["error"]) == (403, "invalid_labels")
    assert await api.snapshot() == before  # no workload, no use consumed
    [entry] = await api.ok("GET", "/v1/audit?limit=1")
    assert (entry["event"], entry["result"], entry["reason"]) == (
        "workload.paired",
        "denied",
        "invalid_labels",
    )


async def test_unwritable_store_is_503_and_recovers(api: Admin) -> None:
    await api.svc.store.set_read_only(True)
    status, body = await api.call("POST", "/v1/profiles", {"name": "p", "labels": {}})
    assert (status, body["error"]) == (503, "unavailable")
    status, body = await api.call("POST", "/v1/rules", RULE)
    assert status == 503
    assert await api.ok("GET", "/v1/rules") == []  # reads still work
    await api.svc.store.set_read_only(False)
    await api.ok("POST", "/v1/profiles", {"name": "p", "labels": {}}, status=201)


async def test_agents_still_fetch_instructions_while_the_store_is_unwritable(
    api: Admin, make_agent: MakeAgent
) -> None:
    agent = await make_agent()
    await api.svc.store.set_read_only(True)
    agent.clock.advance(120)  # past the once-a-minute last_seen write
    status, _ = await agent.instructions()
    assert status == 200
    status, body = await agent.unpair("c1")
    assert (status, body["error"]) == (503, "unavailable")
