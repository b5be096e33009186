"""Enforcement modes and visibility levels: per profile, per workload, pushed in policies."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import Admin, Agent, MakeAgent

CID_A = "a" * 64
CID_B = "b" * 64


async def _two_hosts(api: Admin, make_agent: MakeAgent) -> tuple[Agent, Agent, Any, Any]:
    """db on host a (profile db), web on host b (profile web); no rule links them."""
    db_token = await api.setup_policy(profile="db", labels={"role": "db", "app": "shop"})
    web_token = await api.setup_policy(profile="web", labels={"role": "web", "app": "shop"})
    a = await make_agent("host-a")
    b = await make_agent("host-b")
    status, db = await a.pair(CID_A, db_token, ["10.0.0.2"])
    assert status == 200, db
    status, web = await b.pair(CID_B, web_token, ["10.0.0.3"])
    assert status == 200, web
    return a, b, db, web


def _policy(instr: Any, workload_id: str) -> Any:
    [pol] = [p for p in instr.workloads if p.workload_id == workload_id]
    return pol


async def test_profile_mode_is_in_effect_on_its_workloads_and_wakes_only_their_host(
    api: Admin, make_agent: MakeAgent
) -> None:
    a, b, db, web = await _two_hosts(api, make_agent)
    before_a = (await a.paired(db)).version
    before_b = (await b.paired(web)).version
    prof = await api.ok(
        "PUT", "/v1/profiles/db/mode", {"mode": "visibility", "visibility": "enhanced"}
    )
    assert (prof["mode"], prof["visibility"]) == ("visibility", "enhanced")
    [listed] = [p for p in await api.ok("GET", "/v1/profiles") if p["name"] == "db"]
    assert (listed["mode"], listed["visibility"]) == ("visibility", "enhanced")
    status, signed = await a.instructions(since=before_a, wait=2)
    assert status == 200
    pol = _policy(a.open(signed), db["workload_id"])
    assert (pol.mode, pol.visibility) == ("visibility", "enhanced")
    status, _ = await b.instructions(since=before_b, wait=0)
    assert status == 204  # host b's instructions did not change: it is not woken
    [w] = [w for w in await api.ok("GET", "/v1/workloads") if w["id"] == db["workload_id"]]
    assert (w["mode"], w.get("mode_override"), w["visibility"]) == (
        "visibility",
        None,
        "enhanced",
    )
    # the visibility level is kept when only the mode is given
    prof = await api.ok("PUT", "/v1/profiles/db/mode", {"mode": "full"})
    assert (prof["mode"], prof["visibility"]) == ("full", "enhanced")
    events = [e["event"] for e in await api.ok("GET", "/v1/audit")]
    assert events.count("profile.mode_set") == 2


async def test_workload_mode_overrides_its_profile_until_inherit(
    api: Admin, make_agent: MakeAgent
) -> None:
    a, _b, db, _web = await _two_hosts(api, make_agent)
    v0 = (await a.paired(db)).version
    wid = db["workload_id"]
    w = await api.ok("PUT", f"/v1/workloads/{wid}/mode", {"mode": "idle"})
    assert (w["mode"], w["mode_override"]) == ("idle", "idle")
    status, signed = await a.instructions(since=v0, wait=2)
    assert status == 200
    instr = a.open(signed)
    assert _policy(instr, wid).mode == "idle"
    # the profile's mode does not touch a workload with a mode of its own ...
    await api.ok("PUT", "/v1/profiles/db/mode", {"mode": "visibility"})
    status, _ = await a.instructions(since=instr.version, wait=0)
    assert status == 204
    # ... until it inherits again
    w = await api.ok("PUT", f"/v1/workloads/{wid}/mode", {"mode": None})
    assert (w["mode"], w.get("mode_override")) == ("visibility", None)
    status, signed = await a.instructions(since=instr.version, wait=2)
    assert status == 200 and _policy(a.open(signed), wid).mode == "visibility"
    entries = [e for e in await api.ok("GET", "/v1/audit") if e["event"] == "workload.mode_set"]
    assert [e["workload_id"] for e in entries] == [wid, wid]


async def test_new_workloads_pair_in_their_profiles_mode(api: Admin, make_agent: MakeAgent) -> None:
    await api.ok(
        "POST",
        "/v1/profiles",
        {"name": "p", "labels": {"role": "db"}, "mode": "idle", "visibility": "off"},
        status=201,
    )
    token = (await api.ok("POST", "/v1/keys", {"profile": "p"}, status=201))["token"]
    a = await make_agent("host-a")
    status, res = await a.pair(CID_A, token, ["10.0.0.2"])
    assert status == 200
    pol = _policy(await a.paired(res), res["workload_id"])
    assert (pol.mode, pol.visibility) == ("idle", "off")


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("PUT", "/v1/profiles/db/mode", {"mode": "enforce"}, 400, "invalid_input"),
        ("PUT", "/v1/profiles/db/mode", {"mode": "full", "visibility": "all"}, 400, None),
        ("PUT", "/v1/profiles/db/mode", {}, 400, None),
        ("PUT", "/v1/profiles/db/mode", {"mode": "full", "x": 1}, 400, None),
        ("PUT", "/v1/profiles/nope/mode", {"mode": "full"}, 404, "not_found"),
        ("PUT", "/v1/workloads/w_nope/mode", {"mode": "full"}, 404, "not_found"),
        ("PUT", "/v1/workloads/w_nope/mode", {"mode": "selective"}, 400, None),
    ],
)
async def test_bad_mode_changes_are_refused_and_write_nothing(
    api: Admin,
    make_agent: MakeAgent,
    method: str,
    path: str,
    body: Any,
    status: int,
    code: str | None,
) -> None:
    await _two_hosts(api, make_agent)
    before = await api.snapshot()
    audit = len(await api.ok("GET", "/v1/audit"))
    got, answer = await api.call(method, path, body)
    assert got == status, answer
    assert set(answer) == {"error", "message"}
    if code:
        assert answer["error"] == code
    assert await api.snapshot() == before
    assert len(await api.ok("GET", "/v1/audit")) == audit
