"""Agent endpoints: registration, request signatures, pairing, unpairing, instructions."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgspec
import nacl.signing
import pytest

from segd import crypto
from segd.config import ServerConfig
from segd.server import tokens
from tests.api.conftest import (
    Admin,
    Agent,
    AiohttpClient,
    Clock,
    MakeAgent,
    register_agent,
    start_admin,
)

# ---- registration -------------------------------------------------------------------


async def _register(api: Admin, code: str, key: nacl.signing.SigningKey) -> tuple[int, Any]:
    body = {
        "activation_code": code,
        "public_key": crypto.b64e(bytes(key.verify_key)),
        "hostname": "h1",
    }
    async with api.client.post("/v1/agent/register", json=body) as r:
        return r.status, await r.json()


async def test_activation_code_is_single_use(api: Admin) -> None:
    code = (await api.ok("POST", "/v1/activation-codes", {}, status=201))["code"]
    status, reg = await _register(api, code, nacl.signing.SigningKey.generate())
    assert status == 201 and reg["host_id"].startswith("h_")
    assert reg["server_keys"] == {
        api.svc.pub.key_id: crypto.b64e(bytes(api.svc.signing_key.verify_key))
    }
    status, body = await _register(api, code, nacl.signing.SigningKey.generate())
    assert (status, body["error"]) == (401, "invalid_activation_code")
    assert len(await api.ok("GET", "/v1/hosts")) == 1
    entries = [e for e in await api.ok("GET", "/v1/audit") if e["event"] == "host.registered"]
    assert [(e["result"], e["reason"]) for e in entries] == [
        ("ok", ""),
        ("denied", "invalid_activation_code"),
    ]


async def test_activation_code_expires(api: Admin, clock: Clock) -> None:
    code = (await api.ok("POST", "/v1/activation-codes", {"lifespan_s": 60}, status=201))["code"]
    clock.advance(61)
    status, body = await _register(api, code, nacl.signing.SigningKey.generate())
    assert (status, body["error"]) == (401, "invalid_activation_code")


async def test_a_public_key_registers_once_and_the_code_survives(api: Admin) -> None:
    key = nacl.signing.SigningKey.generate()
    c1 = (await api.ok("POST", "/v1/activation-codes", {}, status=201))["code"]
    c2 = (await api.ok("POST", "/v1/activation-codes", {}, status=201))["code"]
    assert (await _register(api, c1, key))[0] == 201
    status, body = await _register(api, c2, key)
    assert (status, body["error"]) == (409, "public_key_in_use")
    assert (await _register(api, c2, nacl.signing.SigningKey.generate()))[0] == 201


# ---- signed requests ----------------------------------------------------------------

PATH = "/v1/agent/instructions?since=0"


async def test_signed_request_accepted(make_agent: MakeAgent) -> None:
    a = await make_agent()
    status, body = await a.request("GET", PATH)
    assert status == 200 and a.open(body).host_id == a.host_id


async def test_replayed_request_refused(make_agent: MakeAgent) -> None:
    a = await make_agent()
    headers = a.sign("GET", PATH)
    assert (await a.request("GET", PATH, headers=headers))[0] == 200
    status, body = await a.request("GET", PATH, headers=headers)
    assert (status, body["error"]) == (401, "replayed_request")


@pytest.mark.parametrize("offset", [-61.0, 61.0, -3600.0])
async def test_stale_timestamp_refused(make_agent: MakeAgent, clock: Clock, offset: float) -> None:
    a = await make_agent()
    status, body = await a.request("GET", PATH, headers=a.sign("GET", PATH, at=clock() + offset))
    assert (status, body["error"]) == (401, "stale_request")


async def test_request_signed_before_the_server_started_refused(
    api: Admin, make_agent: MakeAgent
) -> None:
    a = await make_agent()
    at = api.svc.started_at - 1.0  # within the skew, but captured before this process
    status, body = await a.request("GET", PATH, headers=a.sign("GET", PATH, at=at))
    assert (status, body["error"]) == (401, "stale_request")


async def test_unregistered_agent_refused(api: Admin, clock: Clock) -> None:
    stranger = Agent(
        api.client, "h_0123456789abcdef", nacl.signing.SigningKey.generate(), clock, {}
    )
    status, body = await stranger.request("GET", PATH)
    assert (status, body["error"]) == (401, "unknown_host")


async def test_revoked_agent_refused(api: Admin, make_agent: MakeAgent) -> None:
    a = await make_agent()
    await api.ok("POST", f"/v1/hosts/{a.host_id}/revoke")
    status, body = await a.request("GET", PATH)
    assert (status, body["error"]) == (403, "host_revoked")


async def test_signature_by_another_key_refused(make_agent: MakeAgent) -> None:
    a = await make_agent()
    a.key = nacl.signing.SigningKey.generate()
    status, body = await a.request("GET", PATH)
    assert (status, body["error"]) == (401, "bad_request_signature")


@pytest.mark.parametrize("part", ["body", "path", "method"])
async def test_tampered_request_refused(make_agent: MakeAgent, part: str) -> None:
    a = await make_agent()
    signed_body = json.dumps({"container_id": "c1"}).encode()
    headers = a.sign("POST", "/v1/agent/unpair", signed_body)
    method, path, data = "POST", "/v1/agent/unpair", signed_body
    if part == "body":
        data = json.dumps({"container_id": "c2"}).encode()
    elif part == "path":
        path = "/v1/agent/report"
    else:
        method = "PUT"
        path = "/v1/agent/unpair"
    async with a.client.request(method, path, data=data, headers=headers) as r:
        body = await r.json()
    expected = (405, "method_not_allowed") if part == "method" else (401, "bad_request_signature")
    assert (r.status, body["error"]) == expected


@pytest.mark.parametrize(
    "drop", [crypto.HDR_AGENT, crypto.HDR_TS, crypto.HDR_NONCE, crypto.HDR_SIG]
)
async def test_unsigned_request_refused(make_agent: MakeAgent, drop: str) -> None:
    a = await make_agent()
    headers = a.sign("GET", PATH)
    del headers[drop]
    status, body = await a.request("GET", PATH, headers=headers)
    assert (status, body["error"]) == (401, "unsigned_request")


# ---- pairing ------------------------------------------------------------------------


async def test_pair_decides_labels_and_answers_its_instructions_version(
    api: Admin, make_agent: MakeAgent
) -> None:
    token = await api.setup_policy(labels={"role": "db", "app": "shop"}, locked=("role",))
    a = await make_agent()
    status, res = await a.pair("c1", token, ["10.0.0.7", "fd00::7"], {"app": "blog", "env": "prod"})
    assert status == 200, res
    assert res["labels"] == {"role": "db", "app": "blog", "env": "prod"}
    instr = await a.paired(res)
    assert instr.host_id == a.host_id and instr.version == 2
    [wp] = instr.workloads
    assert (wp.workload_id, wp.container_id, wp.ips) == (
        res["workload_id"],
        "c1",
        ["10.0.0.7", "fd00::7"],
    )
    [key] = await api.ok("GET", "/v1/keys")
    assert key["uses"] == 1
    [w] = await api.ok("GET", "/v1/workloads")
    assert (w["host_id"], w["key_id"]) == (a.host_id, key["key_id"])


async def test_label_mismatch_denied_or_defaulted(api: Admin, make_agent: MakeAgent) -> None:
    deny = await api.setup_policy(profile="strict", locked=("role", "app"))
    default = await api.setup_policy(profile="lenient", locked=("role",), on_mismatch="default")
    a = await make_agent()
    status, body = await a.pair("c1", deny, ["10.0.0.1"], {"role": "web"})
    assert (status, body["error"]) == (403, "label_mismatch")
    assert "role=web" in body["message"]
    status, res = await a.pair("c2", default, ["10.0.0.2"], {"role": "web", "env": "dev"})
    assert status == 200 and res["labels"] == {"role": "db", "app": "shop"}
    entries = [e for e in await api.ok("GET", "/v1/audit") if e["event"] == "workload.paired"]
    assert [(e["result"], e["reason"]) for e in entries] == [
        ("denied", "label_mismatch"),
        ("ok", "profile_labels_applied"),
    ]


async def _forge(token: str, **changes: Any) -> str:
    claims, _, sig = tokens.parse(token)
    data = json.dumps({**msgspec.to_builtins(claims), **changes}).encode()
    return f"segd1.{crypto.b64e(data)}.{crypto.b64e(sig)}"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        ("forged", "bad_signature"),
        ("foreign", "unknown_signer"),
        ("malformed", "malformed_key"),
        ("revoked", "key_revoked"),
        ("profile_revoked", "key_revoked"),
        ("expired", "key_expired"),
        ("disabled", "profile_disabled"),
        ("deleted", "unknown_key"),
    ],
)
async def test_pairing_refusals_consume_nothing_and_are_audited(
    api: Admin, make_agent: MakeAgent, clock: Clock, mutate: str, reason: str
) -> None:
    token = await api.setup_policy(max_uses=2)
    a = await make_agent()
    if mutate == "forged":
        token = await _forge(token, pid="p_000000000000")
    elif mutate == "foreign":
        other = nacl.signing.SigningKey.generate()
        claims = tokens.parse(token)[0]
        foreign = tokens.Claims(
            v=1, kid=claims.kid, pid=claims.pid, sk="0" * 16, iat=claims.iat, exp=claims.exp
        )
        token = tokens.issue(other, foreign)
    elif mutate == "malformed":
        token = token[:-10]
    elif mutate == "revoked":
        [key] = await api.ok("GET", "/v1/keys")
        await api.ok("POST", f"/v1/keys/{key['key_id']}/revoke")
    elif mutate == "profile_revoked":
        await api.ok("POST", "/v1/profiles/db/revoke")
    elif mutate == "expired":
        clock.advance(3601)
    elif mutate == "disabled":
        await api.ok(
            "POST",
            "/v1/profiles",
            {"name": "off", "labels": {"role": "x"}, "enabled": False},
            status=201,
        )
        token = (await api.ok("POST", "/v1/keys", {"profile": "off"}, status=201))["token"]
    elif mutate == "deleted":
        await api.ok("DELETE", "/v1/profiles/db", status=204)
    before = await api.snapshot()
    status, body = await a.pair("c1", token, ["10.0.0.1"])
    assert (status, body["error"]) == (403, reason), body
    assert await api.snapshot() == before
    [entry] = await api.ok("GET", "/v1/audit?limit=1")
    assert (entry["event"], entry["result"], entry["reason"]) == (
        "workload.paired",
        "denied",
        reason,
    )
    assert entry["host_id"] == a.host_id and entry["container_id"] == "c1"


async def test_exhausted_key_refused(api: Admin, make_agent: MakeAgent) -> None:
    token = await api.setup_policy(max_uses=1)
    a = await make_agent()
    assert (await a.pair("c1", token, ["10.0.0.1"]))[0] == 200
    status, body = await a.pair("c2", token, ["10.0.0.2"])
    assert (status, body["error"]) == (403, "key_exhausted")
    [key] = await api.ok("GET", "/v1/keys")
    assert key["uses"] == 1


async def test_pairing_again_is_idempotent_even_once_the_key_ran_out_and_expired(
    api: Admin, make_agent: MakeAgent, clock: Clock
) -> None:
    token = await api.setup_policy(max_uses=1)
    a = await make_agent()
    s1, first = await a.pair("c1", token, ["10.0.0.1"])
    clock.advance(3601)
    s2, again = await a.pair("c1", token, ["10.0.0.1"])
    assert (s1, s2) == (200, 200)
    assert again["workload_id"] == first["workload_id"]
    assert (await a.paired(again)).version == (await a.paired(first)).version
    [key] = await api.ok("GET", "/v1/keys")
    assert key["uses"] == 1
    assert len(await api.ok("GET", "/v1/workloads")) == 1


async def test_address_held_by_another_workload_denied(api: Admin, make_agent: MakeAgent) -> None:
    """A host-local address is held on its host (another host's is not in its scope)."""
    token = await api.setup_policy(max_uses=5)
    a = await make_agent("a")
    assert (await a.pair("c1", token, ["10.0.0.1"]))[0] == 200
    status, body = await a.pair("c2", token, ["10.0.0.2", "10.0.0.1"])
    assert (status, body["error"]) == (403, "ip_in_use")
    [key] = await api.ok("GET", "/v1/keys")
    assert key["uses"] == 1
    # once the holder is gone, the address is free again
    assert (await a.unpair("c1"))[0] == 204
    assert (await a.pair("c2", token, ["10.0.0.2", "10.0.0.1"]))[0] == 200


async def test_pairing_again_with_new_addresses_readdresses(
    api: Admin, make_agent: MakeAgent
) -> None:
    token = await api.setup_policy()
    a = await make_agent()
    _, first = await a.pair("c1", token, ["10.0.0.1"])
    status, res = await a.pair("c1", token, ["10.0.0.9"])
    assert status == 200 and res["workload_id"] == first["workload_id"]
    assert (await a.paired(res)).workloads[0].ips == ["10.0.0.9"]
    [w] = await api.ok("GET", "/v1/workloads")
    assert w["ips"] == ["10.0.0.9"]
    [key] = await api.ok("GET", "/v1/keys")
    assert key["uses"] == 1


async def test_unpair_removes_the_workload_and_is_idempotent(
    api: Admin, make_agent: MakeAgent
) -> None:
    token = await api.setup_policy()
    a = await make_agent()
    _, res = await a.pair("c1", token, ["10.0.0.1"])
    v = (await a.paired(res)).version
    assert (await a.unpair("c1"))[0] == 204
    assert await api.ok("GET", "/v1/workloads") == []
    status, signed = await a.instructions(since=v)
    assert status == 200 and a.open(signed).workloads == []
    assert (await a.unpair("c1"))[0] == 204
    assert (await a.unpair("never-paired"))[0] == 204


async def test_other_hosts_container_is_not_touched(api: Admin, make_agent: MakeAgent) -> None:
    token = await api.setup_policy()
    a, b = await make_agent("a"), await make_agent("b")
    await a.pair("c1", token, ["10.0.0.1"])
    assert (await b.unpair("c1"))[0] == 204
    assert len(await api.ok("GET", "/v1/workloads")) == 1


async def test_revoking_a_host_drops_its_workloads(api: Admin, make_agent: MakeAgent) -> None:
    token = await api.setup_policy()
    a = await make_agent()
    await a.pair("c1", token, ["10.0.0.1"])
    host = await api.ok("POST", f"/v1/hosts/{a.host_id}/revoke")
    assert host["revoked"] and host["workloads"] == 0
    assert await api.ok("GET", "/v1/workloads") == []


# ---- instructions and reports -------------------------------------------------------


async def test_instructions_by_version(api: Admin, make_agent: MakeAgent) -> None:
    a = await make_agent()
    status, signed = await a.instructions(since=0)
    assert status == 200
    instr = a.open(signed)
    assert instr.version == 1 and instr.workloads == [] and instr.rules == []
    status, body = await a.instructions(since=1, wait=0.05)
    assert (status, body) == (204, None)
    status, body = await a.instructions(since=1)
    assert status == 204
    [host] = await api.ok("GET", "/v1/hosts")
    assert host["instructions_version"] == 1


async def test_long_poll_wait_is_capped_by_config(
    aiohttp_client: AiohttpClient, tmp_path: Path, clock: Clock
) -> None:
    cfg = ServerConfig(data_dir=str(tmp_path / "s"), longpoll_timeout_s=1.0)
    a = await register_agent(await start_admin(aiohttp_client, cfg, clock), clock)
    started = time.monotonic()
    status, _ = await a.instructions(since=1, wait=3600)
    assert status == 204 and time.monotonic() - started < 3


async def test_report_is_audited(api: Admin, make_agent: MakeAgent) -> None:
    a = await make_agent()
    body = {"event": "tamper", "container_id": "c1", "detail": "table flushed"}
    assert (await a.request("POST", "/v1/agent/report", body))[0] == 204
    [e] = await api.ok("GET", "/v1/audit?limit=1")
    assert (e["event"], e["host_id"], e["container_id"], e["detail"]) == (
        "agent.tamper",
        a.host_id,
        "c1",
        "table flushed",
    )


# ---- sidecars -----------------------------------------------------------------------


async def _sidecars(a: Agent, *items: tuple[str, str, str]) -> tuple[int, Any]:
    body = {"sidecars": [{"container_id": c, "shares": s, "name": n} for c, s, n in items]}
    return await a.request("PUT", "/v1/agent/sidecars", body)


async def test_sidecars_are_listed_with_the_workload_they_share(
    api: Admin, make_agent: MakeAgent
) -> None:
    token = await api.setup_policy()
    a, b = await make_agent("a"), await make_agent("b")
    await a.pair("main", token, ["10.0.0.1"], name="web")
    await b.pair("main", token, ["10.0.0.2"], name="web")  # same id on another host
    before = await api.ok("GET", "/v1/hosts")
    # Two sidecars of a workload, and one of a container that is not paired.
    assert (await _sidecars(a, ("s2", "main", "proxy"), ("s1", "main", ""), ("s3", "x", "")))[
        0
    ] == 204
    listed = {(w["host_id"], w["container_id"]): w for w in await api.ok("GET", "/v1/workloads")}
    assert listed[(a.host_id, "main")]["sidecars"] == [
        {"container_id": "s1", "name": ""},
        {"container_id": "s2", "name": "proxy"},
    ]
    assert listed[(b.host_id, "main")]["sidecars"] == []
    assert "s3" not in str(listed)
    [only_a] = await api.ok("GET", f"/v1/workloads?host={a.host_id}")
    assert len(only_a["sidecars"]) == 2
    # Sidecars are not workloads: no instructions change, no host counts them.
    assert await api.ok("GET", "/v1/hosts") == before
    # The list is replaced whole; an empty one clears it.
    assert (await _sidecars(a, ("s1", "main", "")))[0] == 204
    [w] = await api.ok("GET", f"/v1/workloads?host={a.host_id}")
    assert [s["container_id"] for s in w["sidecars"]] == ["s1"]
    assert (await _sidecars(a))[0] == 204
    [w] = await api.ok("GET", f"/v1/workloads?host={a.host_id}")
    assert w["sidecars"] == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"sidecars": [{"container_id": "s", "shares": "s"}]}, "its own namespace"),
        (
            {
                "sidecars": [
                    {"container_id": "s", "shares": "m"},
                    {"container_id": "s", "shares": "m"},
                ]
            },
            "listed twice",
        ),
        ({"sidecars": [{"container_id": "-bad", "shares": "m"}]}, "sidecars[0].container_id"),
        ({"sidecars": [{"container_id": "s", "shares": "m m"}]}, "sidecars[0].shares"),
        ({"sidecars": [{"container_id": "s", "shares": "m", "name": "a\x07"}]}, "control"),
        ({"sidecars": [{"container_id": "s", "shares": "m", "extra": 1}]}, "extra"),
        ({"sidecars": [{"container_id": f"s{i}", "shares": "m"} for i in range(1025)]}, "at most"),
    ],
)
async def test_bad_sidecar_lists_are_refused_and_change_nothing(
    api: Admin, make_agent: MakeAgent, body: dict[str, Any], message: str
) -> None:
    token = await api.setup_policy()
    a = await make_agent()
    await a.pair("m", token, ["10.0.0.1"])
    assert (await _sidecars(a, ("kept", "m", "")))[0] == 204
    status, err = await a.request("PUT", "/v1/agent/sidecars", body)
    assert status == 400 and set(err) == {"error", "message"}, err
    assert message in err["message"], err
    [w] = await api.ok("GET", "/v1/workloads")
    assert [s["container_id"] for s in w["sidecars"]] == ["kept"]


async def test_sidecars_need_a_signed_request(api: Admin, make_agent: MakeAgent) -> None:
    a = await make_agent()
    status, err = await a.request("PUT", "/v1/agent/sidecars", {"sidecars": []}, headers={})
    assert (status, err["error"]) == (401, "unsigned_request")
