"""Pairing a container again (restarts), unlimited keys, admin unpairing, revoking
with `unpair`, and a pairing racing a host revocation."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from tests.api.conftest import Admin, Agent, Clock, MakeAgent


async def _key(api: Admin) -> dict[str, Any]:
    [key] = await api.ok("GET", "/v1/keys")
    return dict(key)


async def _audit(api: Admin, event: str) -> list[tuple[str, str, str]]:
    return [
        (e["result"], e["reason"], e["container_id"])
        for e in await api.ok("GET", "/v1/audit?limit=1000")
        if e["event"] == event
    ]


async def _workloads(api: Admin) -> dict[str, dict[str, Any]]:
    return {w["container_id"]: w for w in await api.ok("GET", "/v1/workloads")}


# ---- §1: a restarted container keeps its pairing ------------------------------------


async def test_restarted_container_lost_its_pairing_to_key_exhausted(
    api: Admin, make_agent: MakeAgent
) -> None:
    """The agent unpairs on `die` and pairs on `start`: the same container pairs
    again with the same key without a use, however often it restarts."""
    token = await api.setup_policy(max_uses=1)
    a = await make_agent()
    assert (await a.pair("c1", token, ["10.0.0.1"]))[0] == 200
    for ip in ("10.0.0.2", "10.0.0.1", "10.0.0.3"):
        assert (await a.unpair("c1"))[0] == 204
        status, res = await a.pair("c1", token, [ip])
        assert status == 200, res
        assert (await a.paired(res)).workloads[0].ips == [ip]
    assert (await _key(api))["uses"] == 1
    assert list(await _workloads(api)) == ["c1"]
    # the key admits no new container all the same
    status, body = await a.pair("c2", token, ["10.0.0.9"])
    assert (status, body["error"]) == (403, "key_exhausted")
    assert await _audit(api, "workload.paired") == [
        ("ok", "", "c1"),
        ("ok", "readmitted", "c1"),
        ("ok", "readmitted", "c1"),
        ("ok", "readmitted", "c1"),
        ("denied", "key_exhausted", "c2"),
    ]


async def test_restart_after_the_key_expired_was_refused_key_expired(
    api: Admin, make_agent: MakeAgent, clock: Clock
) -> None:
    token = await api.setup_policy(max_uses=5)
    a = await make_agent()
    assert (await a.pair("c1", token, ["10.0.0.1"]))[0] == 200
    clock.advance(3601)
    assert (await a.unpair("c1"))[0] == 204
    status, res = await a.pair("c1", token, ["10.0.0.2"])
    assert status == 200, res
    status, body = await a.pair("c2", token, ["10.0.0.3"])
    assert (status, body["error"]) == (403, "key_expired")
    assert (await _key(api))["uses"] == 1


async def test_restart_is_readmitted_on_its_own_host_only(
    api: Admin, make_agent: MakeAgent
) -> None:
    token = await api.setup_policy(max_uses=1)
    a, b = await make_agent("a"), await make_agent("b")
    assert (await a.pair("c1", token, ["10.0.0.1"]))[0] == 200
    status, body = await b.pair("c1", token, ["10.0.0.2"])
    assert (status, body["error"]) == (403, "key_exhausted")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("key_revoked", "key_revoked"),
        ("profile_revoked", "key_revoked"),
        ("profile_deleted", "unknown_key"),
        ("other_key", "key_exhausted"),
    ],
)
async def test_restart_is_refused_as_a_new_container_would_be(
    api: Admin, make_agent: MakeAgent, change: str, reason: str
) -> None:
    """A revoked key, a revoked or deleted profile, or a different key id: the
    restart rule does not apply."""
    token = await api.setup_policy(max_uses=1)
    a = await make_agent()
    assert (await a.pair("c1", token, ["10.0.0.1"]))[0] == 200
    key_id = (await _key(api))["key_id"]
    assert (await a.unpair("c1"))[0] == 204
    if change == "key_revoked":
        await api.ok("POST", f"/v1/keys/{key_id}/revoke")
    elif change == "profile_revoked":
        await api.ok("POST", "/v1/profiles/db/revoke")
    elif change == "profile_deleted":
        await api.ok("DELETE", "/v1/profiles/db", status=204)
    else:
        other = await api.ok("POST", "/v1/keys", {"profile": "db"}, status=201)
        assert (await a.pair("c2", other["token"], ["10.0.0.2"]))[0] == 200
        token = other["token"]
    before = await api.snapshot()
    status, body = await a.pair("c1", token, ["10.0.0.1"])
    assert (status, body["error"]) == (403, reason)
    assert await api.snapshot() == before


async def test_same_new_container_paired_concurrently_uses_one_use(
    api: Admin, make_agent: MakeAgent
) -> None:
    token = await api.setup_policy(max_uses=3)
    a = await make_agent()
    results = await asyncio.gather(*(a.pair("c1", token, ["10.0.0.1"]) for _ in range(10)))
    assert {status for status, _ in results} == {200}
    assert len({res["workload_id"] for _, res in results}) == 1
    assert (await _key(api))["uses"] == 1


# ---- unlimited keys ------------------------------------------------------------------


async def test_unlimited_keys_are_the_default_and_null_in_the_api(
    api: Admin, make_agent: MakeAgent
) -> None:
    body = {"name": "web", "labels": {"role": "web"}}
    prof = await api.ok("POST", "/v1/profiles", body, status=201)
    assert prof["max_uses"] is None
    default = await api.ok("POST", "/v1/keys", {"profile": "web"}, status=201)
    assert default["max_uses"] is None
    limited: dict[str, Any] = {"name": "db", "labels": {"role": "db"}, "max_uses": 2}
    await api.ok("POST", "/v1/profiles", limited, status=201)
    inherited = await api.ok("POST", "/v1/keys", {"profile": "db"}, status=201)
    unlimited_in: dict[str, Any] = {"profile": "db", "max_uses": None}
    unlimited = await api.ok("POST", "/v1/keys", unlimited_in, status=201)
    assert (inherited["max_uses"], unlimited["max_uses"]) == (2, None)
    a = await make_agent()
    results = await asyncio.gather(
        *(a.pair(f"c{i}", unlimited["token"], [f"10.0.1.{i + 1}"]) for i in range(25))
    )
    assert {status for status, _ in results} == {200}
    keys = {k["key_id"]: k for k in await api.ok("GET", "/v1/keys")}
    assert keys[unlimited["key_id"]]["uses"] == 25
    assert keys[unlimited["key_id"]]["max_uses"] is None


# ---- §2: re-pairing checks the key; unpair; revoke with unpair -----------------------


@pytest.mark.parametrize(
    ("presented", "reason"),
    [
        ("garbage", "malformed_key"),
        ("forged", "bad_signature"),
        ("revoked", "key_revoked"),
        ("profile_deleted", "unknown_key"),
        ("other_key", "key_mismatch"),
    ],
)
async def test_repairing_a_paired_container_never_looked_at_the_key(
    api: Admin, make_agent: MakeAgent, presented: str, reason: str
) -> None:
    """The rogue scenario: a paired container pairs again (new address) with
    whatever it likes; the key is checked as for a new pairing, and the refused
    workload is left as it was."""
    token = await api.setup_policy(max_uses=5)
    a = await make_agent()
    _, first = await a.pair("rogue", token, ["10.0.0.1"])
    key_id = (await _key(api))["key_id"]
    if presented == "garbage":
        token = "garbage"
    elif presented == "forged":
        token = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    elif presented == "revoked":
        await api.ok("POST", f"/v1/keys/{key_id}/revoke")
    elif presented == "profile_deleted":
        await api.ok("POST", f"/v1/keys/{key_id}/revoke")
        await api.ok("POST", "/v1/profiles/db/revoke")
        await api.ok("DELETE", "/v1/profiles/db", status=204)
    else:
        token = (await api.ok("POST", "/v1/keys", {"profile": "db"}, status=201))["token"]
    before = await api.snapshot()
    status, body = await a.pair("rogue", token, ["10.0.0.2"])
    assert (status, body["error"]) == (403, reason), body
    assert await api.snapshot() == before
    [entry] = await api.ok("GET", "/v1/audit?limit=1")
    assert (entry["event"], entry["result"], entry["reason"], entry["workload_id"]) == (
        "workload.paired",
        "denied",
        reason,
        first["workload_id"],
    )


async def _shop(api: Admin, make_agent: MakeAgent) -> tuple[Agent, Agent, str, str]:
    """web on host a (key w), db on host b (key d); web -> db on tcp/5432."""
    await api.ok(
        "POST",
        "/v1/rules",
        {"providers": [{"role": "db"}], "consumers": [{"role": "web"}], "services": ["tcp/5432"]},
        status=201,
    )
    web = await api.setup_policy(profile="web", labels={"role": "web"})
    db = await api.setup_policy(profile="db", labels={"role": "db"})
    a, b = await make_agent("a"), await make_agent("b")
    await a.join_mesh()  # 10.200.0.0/24
    await b.join_mesh()  # 10.200.1.0/24
    assert (await a.pair("web1", web, [WEB1]))[0] == 200
    assert (await a.pair("web2", web, [WEB2]))[0] == 200
    assert (await b.pair("db1", db, ["10.200.1.3"]))[0] == 200
    return a, b, web, db


WEB1, WEB2 = "10.200.0.1", "10.200.0.2"  # mesh addresses, seen on every host


async def _latest(agent: Agent) -> Any:
    status, signed = await agent.instructions(since=0)
    assert status == 200
    return agent.open(signed)


async def test_one_workload_could_not_be_unpaired(api: Admin, make_agent: MakeAgent) -> None:
    """`DELETE /v1/workloads/{id}`: gone from every host's instructions in one
    change; the container is held: it does not pair again, a new one does."""
    a, b, web, _ = await _shop(api, make_agent)
    wid = (await _workloads(api))["web1"]["id"]
    before = {h.host_id: h.version for h in (await _latest(a), await _latest(b))}
    assert await api.ok("DELETE", f"/v1/workloads/{wid}", status=204) is None
    ia, ib = await _latest(a), await _latest(b)
    assert ia.version == ib.version > max(before.values())  # one commit, one generation
    assert [w.container_id for w in ia.workloads] == ["web2"]
    assert WEB1 not in {ip for ips in ib.sets.values() for ip in ips}
    assert WEB2 in {ip for ips in ib.sets.values() for ip in ips}
    assert set(await _workloads(api)) == {"web2", "db1"}
    # the agent keeps it isolated: its pairing again (and after a restart) is refused
    for _ in range(2):
        status, body = await a.pair("web1", web, [WEB1])
        assert (status, body["error"]) == (403, "unpaired_by_admin")
        assert (await a.unpair("web1"))[0] == 204
    assert (await a.pair("web1-new", web, [WEB1]))[0] == 200
    assert ("ok", "unpaired_by_admin", "web1") in await _audit(api, "workload.unpaired")
    status, body = await api.call("DELETE", f"/v1/workloads/{wid}")
    assert (status, body["error"]) == (404, "not_found")


@pytest.mark.parametrize("scope", ["key", "profile"])
async def test_revoking_a_key_left_what_it_paired_in_place(
    api: Admin, make_agent: MakeAgent, scope: str
) -> None:
    a, b, web, _ = await _shop(api, make_agent)
    web_key = next(k["key_id"] for k in await api.ok("GET", "/v1/keys") if k["profile"] == "web")
    # a second host runs a container with the same key
    c = await make_agent("c")
    await c.join_mesh()
    assert (await c.pair("web3", web, [c.ip(4)]))[0] == 200
    path = f"/v1/keys/{web_key}/revoke" if scope == "key" else "/v1/profiles/web/revoke"
    before = {h.host_id: h.version for h in (await _latest(a), await _latest(b))}
    await api.ok("POST", path, {"unpair": True})
    assert set(await _workloads(api)) == {"db1"}
    ia, ib, ic = await _latest(a), await _latest(b), await _latest(c)
    assert ia.workloads == [] and ic.workloads == []
    # both changed in the one commit: both at its generation
    assert ia.version == ib.version > max(before.values())
    assert not {ip for ips in ib.sets.values() for ip in ips} & {WEB1, WEB2}
    reason = f"{scope}_revoked"
    unpaired = await _audit(api, "workload.unpaired")
    assert sorted(unpaired) == [("ok", reason, c) for c in ("web1", "web2", "web3")]
    status, body = await a.pair("web1", web, ["10.0.0.1"])
    assert (status, body["error"]) == (403, "key_revoked")


@pytest.mark.parametrize("body", [None, {}, {"unpair": False}])
async def test_revoking_without_unpair_leaves_workloads(
    api: Admin, make_agent: MakeAgent, body: Any
) -> None:
    await _shop(api, make_agent)
    web_key = next(k["key_id"] for k in await api.ok("GET", "/v1/keys") if k["profile"] == "web")
    revoked = await api.ok("POST", f"/v1/keys/{web_key}/revoke", body)
    assert revoked["revoked"] is True
    keys = await api.ok("POST", "/v1/profiles/db/revoke", body)
    assert [k["revoked"] for k in keys] == [True]
    assert set(await _workloads(api)) == {"web1", "web2", "db1"}


# ---- §8: a pairing racing a host revocation ------------------------------------------


async def test_pairing_racing_a_host_revocation_answered_500_and_used_a_key(
    api: Admin, make_agent: MakeAgent
) -> None:
    """Pairings and a revocation of their host, the revocation a few event-loop
    turns later each round, so that it lands before, among and after them."""
    token = await api.setup_policy(max_uses=1000)
    outcomes: Counter[str] = Counter()
    for i in range(60):
        a = await make_agent(f"h{i}")

        async def revoke(turns: int, host_id: str = a.host_id) -> tuple[int, Any]:
            for _ in range(turns):
                await asyncio.sleep(0)
            return await api.call("POST", f"/v1/hosts/{host_id}/revoke")

        *paired, (revoked, _) = await asyncio.gather(
            *(a.pair(f"c{i}-{j}", token, [f"10.{j}.{i}.1"]) for j in range(4)),
            revoke(i % 12),
        )
        assert revoked == 200
        for status, body in paired:
            assert status in (200, 403), body
            outcomes["ok" if status == 200 else body["error"]] += 1
    assert set(outcomes) <= {"ok", "host_revoked"}, outcomes
    assert (await _key(api))["uses"] == outcomes["ok"]
    assert await api.ok("GET", "/v1/workloads") == []
    assert all(h["revoked"] and h["workloads"] == 0 for h in await api.ok("GET", "/v1/hosts"))
    denied = Counter(r for r, _, _ in await _audit(api, "workload.paired"))
    assert denied["ok"] == outcomes["ok"]
