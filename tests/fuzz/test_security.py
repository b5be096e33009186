"""Security cases as explicit tests, beside the ones tests/api already holds
(forged/foreign/malformed keys, stale and tampered signatures, one replay, one
revoked and one unknown agent, a basic label mismatch, a held address):

- keys issued by another segd server;
- replays of state-changing agent requests, also concurrent ones;
- unregistered and revoked agents on every agent route;
- label escalation on locked dimensions, in both `on_mismatch` modes;
- label values and names carrying SQL, shell or nftables syntax, or a stray
  newline, refused before the store (and so never reaching a ruleset);
- oversized label sets; a container claiming another live workload's address.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from segd import crypto
from segd.config import ServerConfig
from segd.server.api import ROUTES
from tests.api.conftest import (
    Admin,
    Agent,
    AiohttpClient,
    Clock,
    MakeAgent,
    start_admin,
)
from tests.fuzz.harness import CONTAINER_ID, Env, state

AGENT_ROUTES = [r for r in ROUTES if r.auth == "agent"]

# Values that must never become a label, a name or an id: SQL, shell and nft
# syntax, line breaks anywhere (also the final newline a `$` anchor lets through),
# NUL and other control characters, lookalikes, and the empty string.
HOSTILE_VALUES = [
    "x'; DROP TABLE workloads; --",
    "' OR '1'='1",
    "$(reboot)",
    "`reboot`",
    "a;reboot",
    "a|reboot",
    "} ; flush ruleset",
    "db } ; flush ruleset ; table inet segd {",
    'db" ; add rule inet segd input accept ; "',
    "@ls_0000000000000000",
    "db\n",
    "db\nflush ruleset",
    "db\r\n",
    "\ndb",
    "db\x00",
    "d\x00b",
    "db\x0b",
    "db\u2028",
    "db ",
    " db",
    "d b",
    "\u202edb",
    "\uff44\uff42",
    "db\ufeff",
    "a" * 64,
    "",
    "-db",
    ".db",
]


def _new_audit(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """Take the audit out of both snapshots; return the entries `after` added."""
    seen = max((e["id"] for e in before.pop("audit")), default=0)
    return [e for e in after.pop("audit") if e["id"] > seen]


async def _with_policy(api: Admin, on_mismatch: str = "deny") -> str:
    return await api.setup_policy(
        labels={"role": "db", "app": "shop"}, locked=("role",), on_mismatch=on_mismatch
    )


# ---- keys from another server ----------------------------------------------------------


async def test_a_key_issued_by_another_segd_server_is_refused(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    api: Admin,
    make_agent: MakeAgent,
    clock: Clock,
) -> None:
    """Same profile name, same labels, a real token: signed by the other server's key."""
    other = await start_admin(aiohttp_client, ServerConfig(data_dir=str(tmp_path / "other")), clock)
    await _with_policy(api)
    foreign = await _with_policy(other)
    a = await make_agent()
    before = await state(api)
    status, body = await a.pair("c1", foreign, ["10.0.0.1"])
    assert (status, body["error"]) == (403, "unknown_signer")
    [entry] = _new_audit(before, after := await state(api))
    assert after == before
    assert (entry["result"], entry["reason"]) == ("denied", "unknown_signer")


async def test_a_key_resigned_under_this_servers_key_id_is_refused(
    api: Admin, make_agent: MakeAgent
) -> None:
    """Claims copied from a real key, signed by another key that claims our key id."""
    token = await _with_policy(api)
    _, claims_b64, _ = token.split(".")
    data = crypto.b64d(claims_b64)
    forged = (
        f"segd1.{claims_b64}.{crypto.b64e(nacl.signing.SigningKey.generate().sign(data).signature)}"
    )
    a = await make_agent()
    status, body = await a.pair("c1", forged, ["10.0.0.1"])
    assert (status, body["error"]) == (403, "bad_signature")
    [key] = await api.ok("GET", "/v1/keys")
    assert key["uses"] == 0


# ---- replays ---------------------------------------------------------------------------


async def _send(
    agent: Agent, method: str, path: str, data: bytes, headers: dict[str, str]
) -> tuple[int, Any]:
    async with agent.client.request(method, path, data=data, headers=headers) as r:
        raw = await r.read()
        return r.status, (json.loads(raw) if raw else None)


async def test_a_replayed_pairing_does_not_pair_again_after_an_unpair(
    api: Admin, make_agent: MakeAgent
) -> None:
    token = await _with_policy(api)
    a = await make_agent()
    pair = json.dumps({"container_id": "c1", "pairing_key": token, "ips": ["10.0.0.1"]}).encode()
    captured = a.sign("POST", "/v1/agent/pair", pair)
    assert (await _send(a, "POST", "/v1/agent/pair", pair, captured))[0] == 200
    assert (await a.unpair("c1"))[0] == 204
    status, body = await _send(a, "POST", "/v1/agent/pair", pair, captured)
    assert (status, body["error"]) == (401, "replayed_request")
    assert await api.ok("GET", "/v1/workloads") == []
    [key] = await api.ok("GET", "/v1/keys")
    assert key["uses"] == 1


async def test_a_replayed_unpair_does_not_remove_the_workload_paired_again(
    api: Admin, make_agent: MakeAgent
) -> None:
    token = await _with_policy(api)
    a = await make_agent()
    assert (await a.pair("c1", token, ["10.0.0.1"]))[0] == 200
    unpair = json.dumps({"container_id": "c1"}).encode()
    captured = a.sign("POST", "/v1/agent/unpair", unpair)
    assert (await _send(a, "POST", "/v1/agent/unpair", unpair, captured))[0] == 204
    assert (await a.pair("c1", token, ["10.0.0.1"]))[0] == 200
    status, body = await _send(a, "POST", "/v1/agent/unpair", unpair, captured)
    assert (status, body["error"]) == (401, "replayed_request")
    assert len(await api.ok("GET", "/v1/workloads")) == 1


async def test_a_replay_after_the_skew_window_is_stale(
    api: Admin, make_agent: MakeAgent, clock: Clock
) -> None:
    token = await _with_policy(api)
    a = await make_agent()
    pair = json.dumps({"container_id": "c1", "pairing_key": token, "ips": ["10.0.0.1"]}).encode()
    captured = a.sign("POST", "/v1/agent/pair", pair)
    assert (await _send(a, "POST", "/v1/agent/pair", pair, captured))[0] == 200
    assert (await a.unpair("c1"))[0] == 204
    clock.advance(3 * 60)  # the nonce is forgotten by now: the timestamp still refuses it
    status, body = await _send(a, "POST", "/v1/agent/pair", pair, captured)
    assert (status, body["error"]) == (401, "stale_request")
    assert await api.ok("GET", "/v1/workloads") == []


async def test_concurrent_copies_of_one_signed_request_are_taken_once(
    api: Admin, make_agent: MakeAgent
) -> None:
    token = await api.setup_policy(max_uses=20)
    a = await make_agent()
    pair = json.dumps({"container_id": "c1", "pairing_key": token, "ips": ["10.0.0.1"]}).encode()
    captured = a.sign("POST", "/v1/agent/pair", pair)
    answers = await asyncio.gather(
        *(_send(a, "POST", "/v1/agent/pair", pair, captured) for _ in range(12))
    )
    statuses = sorted(s for s, _ in answers)
    assert statuses == [200] + [401] * 11, answers
    assert {b["error"] for s, b in answers if s == 401} == {"replayed_request"}
    [key] = await api.ok("GET", "/v1/keys")
    assert key["uses"] == 1


# ---- unknown and revoked agents on every route ----------------------------------------


def _body_for(path: str, token: str) -> bytes:
    return {
        "/v1/agent/pair": json.dumps(
            {"container_id": "c9", "pairing_key": token, "ips": ["10.0.0.9"]}
        ).encode(),
        "/v1/agent/unpair": json.dumps({"container_id": "c1"}).encode(),
        "/v1/agent/report": json.dumps({"event": "tamper", "detail": "x"}).encode(),
    }.get(path, b"")


@pytest.mark.parametrize("route", AGENT_ROUTES, ids=lambda r: r.path)
@pytest.mark.parametrize("who", ["unregistered", "revoked", "revoked_signing_as_other"])
async def test_unknown_and_revoked_agents_are_refused_on_every_agent_route(
    api: Admin, make_agent: MakeAgent, clock: Clock, route: Any, who: str
) -> None:
    token = await _with_policy(api)
    a, b = await make_agent("a"), await make_agent("b")
    assert (await a.pair("c1", token, ["10.0.0.1"]))[0] == 200
    if who == "unregistered":
        caller = Agent(
            api.client, "h_00000000000000aa", nacl.signing.SigningKey.generate(), clock, {}
        )
        expected = (401, "unknown_host")
    else:
        await api.ok("POST", f"/v1/hosts/{b.host_id}/revoke")
        caller = b
        expected = (403, "host_revoked")
        if who == "revoked_signing_as_other":
            # b's key, a's host id: the signature cannot verify under a's key.
            caller = Agent(api.client, a.host_id, b.key, clock, {})
            expected = (401, "bad_request_signature")
    before = await state(api)
    data = _body_for(route.path, token)
    status, body = await caller.raw(route.method, route.path, data)
    assert (status, body["error"]) == expected
    assert await state(api) == before


# ---- label escalation ------------------------------------------------------------------

ESCALATIONS: list[tuple[str, Any]] = [
    ("other value", {"role": "admin"}),
    ("other case", {"role": "DB"}),
    ("extra locked-looking dim", {"role": "admin", "app": "shop"}),
]


@pytest.mark.parametrize(("name", "requested"), ESCALATIONS, ids=[e[0] for e in ESCALATIONS])
@pytest.mark.parametrize("mode", ["deny", "default"])
async def test_a_locked_dimension_cannot_be_escalated(
    api: Admin, make_agent: MakeAgent, name: str, requested: dict[str, str], mode: str
) -> None:
    token = await _with_policy(api, on_mismatch=mode)
    a = await make_agent()
    status, body = await a.pair("c1", token, ["10.0.0.1"], requested)
    if mode == "deny":
        assert (status, body["error"]) == (403, "label_mismatch")
        assert await api.ok("GET", "/v1/workloads") == []
    else:
        assert status == 200 and body["labels"] == {"role": "db", "app": "shop"}


@pytest.mark.parametrize("mode", ["deny", "default"])
async def test_a_duplicate_key_cannot_smuggle_a_locked_value(
    api: Admin, make_agent: MakeAgent, mode: str
) -> None:
    """`{"role": "db", "role": "admin"}`: whichever copy wins, role stays db."""
    token = await _with_policy(api, on_mismatch=mode)
    a = await make_agent()
    for first, second in (("db", "admin"), ("admin", "db")):
        cid = f"c-{first}"
        raw = (
            f'{{"container_id": "{cid}", "pairing_key": "{token}", "ips": ["10.0.0.{len(first)}"], '
            f'"requested_labels": {{"role": "{first}", "role": "{second}"}}}}'
        )
        status, body = await a.raw("POST", "/v1/agent/pair", raw.encode())
        if status == 200:
            assert body["labels"]["role"] == "db", body
        else:
            assert (status, body["error"]) == (403, "label_mismatch")
    for w in await api.ok("GET", "/v1/workloads"):
        assert w["labels"]["role"] == "db"


async def test_pairing_again_with_a_stronger_key_keeps_the_labels(
    api: Admin, make_agent: MakeAgent
) -> None:
    """A paired container cannot trade up by asking again with another profile's key."""
    web = await api.setup_policy(profile="web", labels={"role": "web"}, locked=("role",))
    db = await api.setup_policy(profile="db", labels={"role": "db"}, locked=("role",))
    a = await make_agent()
    status, first = await a.pair("c1", web, ["10.0.0.1"])
    assert status == 200 and first["labels"] == {"role": "web"}
    status, again = await a.pair("c1", db, ["10.0.0.1"], {"role": "db"})
    assert (status, again["error"]) == (403, "key_mismatch")
    [w] = await api.ok("GET", "/v1/workloads")
    assert (w["id"], w["labels"]) == (first["workload_id"], {"role": "web"})
    uses = {k["profile"]: k["uses"] for k in await api.ok("GET", "/v1/keys")}
    assert uses == {"web": 1, "db": 0}


# ---- hostile values never reach the store ----------------------------------------------


@pytest.mark.parametrize("value", HOSTILE_VALUES)
async def test_hostile_label_values_are_refused_before_the_store(
    api: Admin, make_agent: MakeAgent, value: str
) -> None:
    token = await _with_policy(api)
    a = await make_agent()
    before = await state(api)
    attempts = [
        ("POST", "/v1/profiles", {"name": "p2", "labels": {"role": value}}),
        ("POST", "/v1/profiles", {"name": "p2", "labels": {"role": "x", value: "x"}}),
        ("POST", "/v1/profiles", {"name": value, "labels": {}}),
        ("POST", "/v1/profiles", {"name": "p2", "labels": {"role": "x"}, "locked": [value]}),
        (
            "POST",
            "/v1/rules",
            {"providers": [{"role": value}], "consumers": "any", "services": ["tcp/1"]},
        ),
        (
            "POST",
            "/v1/rules",
            {"providers": "any", "consumers": [{value: "x"}], "services": ["tcp/1"]},
        ),
        ("POST", "/v1/rules", {"providers": "any", "consumers": "any", "services": [value]}),
        (
            "POST",
            "/v1/rules",
            {"providers": "any", "consumers": "any", "services": [f"tcp/1{value or ' '}2"]},
        ),
        (
            "POST",
            "/v1/rules",
            {"providers": "any", "consumers": "any", "services": ["tcp/1"], "options": [value]},
        ),
        ("POST", "/v1/keys", {"profile": value}),
    ]
    for method, path, body in attempts:
        status, answer = await api.call(method, path, body)
        assert 400 <= status < 500 and answer["message"].isprintable(), (path, body, answer)
    bad_cid = value if not CONTAINER_ID.fullmatch(value) else value + "\n"
    for cid, labels in ((bad_cid, {}), ("c1", {"env": value}), ("c2", {value: "x"})):
        status, answer = await a.pair(cid, token, ["10.0.0.1"], labels)
        assert status in (400, 403), (cid, labels, answer)
    status, _ = await a.request("POST", "/v1/agent/unpair", {"container_id": bad_cid})
    assert status == 400
    refusals = _new_audit(before, after := await state(api))
    assert after == before
    assert {(e["event"], e["result"]) for e in refusals} <= {("workload.paired", "denied")}
    assert all("\n" not in e["key_id"] and "\n" not in e["container_id"] for e in refusals)


@pytest.mark.parametrize("value", ["web\n", "host\n", "h\x00", "h;reboot", "h x", "$(reboot)"])
async def test_hostile_hostnames_and_events_are_refused(
    api: Admin, make_agent: MakeAgent, value: str
) -> None:
    code = await api.ok("POST", "/v1/activation-codes", {}, status=201)
    body = {
        "activation_code": code["code"],
        "public_key": crypto.b64e(bytes(nacl.signing.SigningKey.generate().verify_key)),
        "hostname": value,
    }
    async with api.client.post("/v1/agent/register", json=body) as r:
        assert r.status == 400
    a = await make_agent()
    for report in ({"event": value}, {"event": "tamper", "container_id": value}):
        status, _ = await a.request("POST", "/v1/agent/report", report)
        assert status == 400, report
    assert len(await api.ok("GET", "/v1/hosts")) == 1


# ---- oversized label sets -------------------------------------------------------------

OVERSIZED: list[tuple[str, dict[str, str]]] = [
    ("more dimensions than exist", {f"d{i}": "x" for i in range(17)}),
    ("a thousand labels", {f"k{i}": "v" for i in range(1000)}),
    ("a 64-character value", {"role": "v" * 64}),
    ("a 33-character dimension", {"r" * 33: "x"}),
    ("a huge value", {"role": "v" * 50_000}),
]


@pytest.mark.parametrize(("name", "labels"), OVERSIZED, ids=[o[0] for o in OVERSIZED])
async def test_oversized_label_sets_are_refused(
    api: Admin, make_agent: MakeAgent, name: str, labels: dict[str, str]
) -> None:
    token = await _with_policy(api)
    a = await make_agent()
    before = await state(api)
    status, _ = await api.call("POST", "/v1/profiles", {"name": "big", "labels": labels})
    assert status in (400, 413)
    rule = {"providers": [labels], "consumers": "any", "services": ["tcp/1"]}
    assert (await api.call("POST", "/v1/rules", rule))[0] in (400, 413)
    status, _ = await a.pair("c1", token, ["10.0.0.1"], labels)
    assert status in (403, 413)
    _new_audit(before, after := await state(api))
    assert after == before


# ---- a container claiming another workload's address ---------------------------------


@pytest.mark.parametrize(
    ("held", "claimed"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("fd00::1", "FD00:0:0:0::1"),
        ("fd00::1", "fd00:0000:0000:0000:0000:0000:0000:0001"),
        ("fd00::a:1", "fd00:0:0:0:0:0:a:1"),
    ],
)
async def test_an_address_held_by_a_live_workload_cannot_be_claimed(
    api: Admin, make_agent: MakeAgent, held: str, claimed: str
) -> None:
    """On its host (a host-local address is unique there; a mesh address of another
    host's subnet is refused before: tests/api/test_mesh.py), in any spelling."""
    token = await api.setup_policy(max_uses=5)
    a = await make_agent("a")
    assert (await a.pair("c1", token, [held]))[0] == 200
    before = await state(api)
    status, body = await a.pair("c2", token, ["10.0.0.2", claimed])
    assert (status, body["error"]) == (403, "ip_in_use")
    # ... nor taken over by re-addressing a workload already paired
    assert (await a.pair("c3", token, ["10.0.0.3"]))[0] == 200
    status, body = await a.pair("c3", token, ["10.0.0.3", claimed])
    assert (status, body["error"]) == (403, "ip_in_use")
    ips = {w["container_id"]: w["ips"] for w in await api.ok("GET", "/v1/workloads")}
    assert ips["c1"] == before["workloads"][0]["ips"] and ips["c3"] == ["10.0.0.3"]
    entries = [e for e in await api.ok("GET", "/v1/audit?limit=3") if e["result"] == "denied"]
    assert {(e["event"], e["reason"]) for e in entries} == {
        ("workload.paired", "ip_in_use"),
        ("workload.readdressed", "ip_in_use"),
    }


async def test_a_scoped_address_is_refused(api: Admin, make_agent: MakeAgent) -> None:
    """`fe80::1%eth0` parses as an address, but no peer's nft set can hold it:
    stored, it made every peer's ruleset fail to render."""
    token = await _with_policy(api)
    a = await make_agent()
    for ip in ("fe80::1%eth0", "fd00::1%1"):
        status, body = await a.pair("c1", token, [ip])
        assert (status, body["error"]) == (400, "invalid_input"), body
    assert await api.ok("GET", "/v1/workloads") == []


# ---- the fuzz environment holds up under the same attacks ------------------------------


async def test_populated_env_refuses_foreign_key(env: Env) -> None:
    status, body = await env.a.pair("c-foreign", env.foreign_token, ["10.9.9.9"])
    assert (status, body["error"]) == (403, "unknown_signer")
