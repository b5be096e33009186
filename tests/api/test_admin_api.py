"""Admin endpoints, happy paths: rules, profiles, keys, listings, audit, OpenAPI."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from segd.config import ServerConfig
from segd.server.api import ROUTES
from tests.api.conftest import Admin, MakeAgent

RULE = {
    "providers": [{"role": "db", "app": "shop"}],
    "consumers": [{"role": "web", "app": "shop"}],
    "services": ["tcp/5432", "TCP/8000-8100", "icmp", "tcp/5432"],
    "options": ["log"],
    "description": "web to db",
}


async def test_health_needs_no_token(api: Admin) -> None:
    status, body = await api.call("GET", "/v1/health", token="")
    assert status == 200
    assert body["status"] == "ok" and body["key_id"] == api.svc.pub.key_id


async def test_admin_routes_need_the_token(api: Admin) -> None:
    for route in ROUTES:
        if route.auth != "admin":
            continue
        path = route.path.format(id="x", name="x", key_id="x")
        for token in ("", "wrong"):
            status, body = await api.call(route.method, path, {}, token=token)
            assert (status, body["error"]) == (401, "unauthorized"), route.path


async def test_rule_add_list_rm(api: Admin) -> None:
    rule = await api.ok("POST", "/v1/rules", RULE, status=201)
    assert rule["id"].startswith("r_")
    assert rule["services"] == ["icmp", "tcp/5432", "tcp/8000-8100"]  # normalised, sorted, unique
    assert rule["providers"] == [{"app": "shop", "role": "db"}]
    assert rule["options"] == ["log"]
    any_rule = await api.ok(
        "POST",
        "/v1/rules",
        {"providers": "any", "consumers": [{}], "services": ["udp/53"]},
        status=201,
    )
    assert [r["id"] for r in await api.ok("GET", "/v1/rules")] == [rule["id"], any_rule["id"]]
    assert await api.ok("DELETE", f"/v1/rules/{rule['id']}", status=204) is None
    assert [r["id"] for r in await api.ok("GET", "/v1/rules")] == [any_rule["id"]]
    status, body = await api.call("DELETE", f"/v1/rules/{rule['id']}")
    assert (status, body["error"]) == (404, "not_found")


async def test_profile_add_list_rm(api: Admin) -> None:
    prof = await api.ok(
        "POST",
        "/v1/profiles",
        {"name": "web", "labels": {"role": "web", "app": "shop"}, "locked": ["role", "role"]},
        status=201,
    )
    assert prof["locked"] == ["role"] and prof["max_uses"] is None and prof["on_mismatch"] == "deny"
    assert [p["name"] for p in await api.ok("GET", "/v1/profiles")] == ["web"]
    status, body = await api.call("POST", "/v1/profiles", {"name": "web", "labels": {}})
    assert (status, body["error"]) == (409, "exists")
    await api.ok("POST", "/v1/keys", {"profile": "web"}, status=201)
    await api.ok("DELETE", "/v1/profiles/web", status=204)
    assert await api.ok("GET", "/v1/profiles") == []
    assert await api.ok("GET", "/v1/keys") == []  # its keys went with it
    status, body = await api.call("DELETE", "/v1/profiles/web")
    assert status == 404


async def test_keys_issue_list_revoke(api: Admin) -> None:
    await api.ok(
        "POST",
        "/v1/profiles",
        {"name": "db", "labels": {"role": "db"}, "max_uses": 3, "lifespan_s": 600},
        status=201,
    )
    await api.ok("POST", "/v1/profiles", {"name": "web", "labels": {"role": "web"}}, status=201)
    k1 = await api.ok("POST", "/v1/keys", {"profile": "db"}, status=201)
    assert k1["token"].startswith("segd1.") and k1["max_uses"] == 3
    k2 = await api.ok(
        "POST",
        "/v1/keys",
        {"profile": "db", "max_uses": 9, "lifespan_s": 60, "description": "ci"},
        status=201,
    )
    assert k2["max_uses"] == 9 and k2["expires_at"] - k1["expires_at"] < 0
    k3 = await api.ok("POST", "/v1/keys", {"profile": "web"}, status=201)
    assert {k["key_id"] for k in await api.ok("GET", "/v1/keys")} == {
        k1["key_id"],
        k2["key_id"],
        k3["key_id"],
    }
    only_db = await api.ok("GET", "/v1/keys?profile=db")
    assert [k["key_id"] for k in only_db] == [k1["key_id"], k2["key_id"]]
    assert only_db[1]["description"] == "ci" and only_db[1]["uses"] == 0
    status, _ = await api.call("GET", "/v1/keys?profile=nope")
    assert status == 404
    revoked = await api.ok("POST", f"/v1/keys/{k1['key_id']}/revoke")
    assert revoked["revoked"] is True and revoked["key_id"] == k1["key_id"]
    status, _ = await api.call("POST", "/v1/keys/k_0000000000000000/revoke")
    assert status == 404
    keys = await api.ok("POST", "/v1/profiles/db/revoke")
    assert [k["revoked"] for k in keys] == [True, True]
    assert not (await api.ok("GET", "/v1/keys?profile=web"))[0]["revoked"]
    status, _ = await api.call("POST", "/v1/profiles/nope/revoke")
    assert status == 404
    status, _ = await api.call("POST", "/v1/keys", {"profile": "nope"})
    assert status == 404


async def test_activation_code_and_hosts(api: Admin, make_agent: MakeAgent) -> None:
    code = await api.ok("POST", "/v1/activation-codes", {"lifespan_s": 120}, status=201)
    assert len(code["code"]) >= 24
    a = await make_agent("alpha")
    hosts = await api.ok("GET", "/v1/hosts")
    assert [(h["id"], h["hostname"], h["revoked"], h["workloads"]) for h in hosts] == [
        (a.host_id, "alpha", False, 0)
    ]
    assert hosts[0]["instructions_version"] == 1
    revoked = await api.ok("POST", f"/v1/hosts/{a.host_id}/revoke")
    assert revoked["revoked"] is True
    status, _ = await api.call("POST", "/v1/hosts/h_00/revoke")
    assert status == 404


async def test_workloads_listing_and_host_filter(api: Admin, make_agent: MakeAgent) -> None:
    token = await api.setup_policy()
    a, b = await make_agent("a"), await make_agent("b")
    assert (await a.pair("c1", token, ["10.0.0.1"], name="db-1"))[0] == 200
    assert (await b.pair("c2", token, ["10.0.0.2"]))[0] == 200
    all_w = await api.ok("GET", "/v1/workloads")
    assert [(w["container_id"], w["name"]) for w in all_w] == [("c1", "db-1"), ("c2", "")]
    only_b = await api.ok("GET", f"/v1/workloads?host={b.host_id}")
    assert [w["container_id"] for w in only_b] == ["c2"]


async def test_audit_latest_and_after(api: Admin) -> None:
    for i in range(5):
        await api.ok("POST", "/v1/profiles", {"name": f"p{i}", "labels": {}}, status=201)
    latest = await api.ok("GET", "/v1/audit?limit=2")
    assert [e["detail"] for e in latest] == ["p3", "p4"]
    first = latest[0]["id"]
    after = await api.ok("GET", f"/v1/audit?after={first - 2}&limit=10")
    assert [e["detail"] for e in after] == ["p2", "p3", "p4"]
    assert all(e["event"] == "profile.added" and e["result"] == "ok" for e in after)


async def test_openapi_lists_every_route_with_schemas(api: Admin) -> None:
    status, doc = await api.call("GET", "/v1/openapi.json", token="")
    assert status == 200 and doc["openapi"].startswith("3.1")
    for r in ROUTES:
        op = doc["paths"][r.path][r.method.lower()]
        if r.body is not None:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{r.body.__name__}"
        assert "4XX" in op["responses"]
    schemas = doc["components"]["schemas"]
    assert {"RuleIn", "Rule", "PairIn", "PairResult", "SignedInstructions", "Error"} <= set(schemas)
    assert schemas["PairIn"]["additionalProperties"] is False


async def test_first_start_writes_secrets_0600(api: Admin, server_cfg: ServerConfig) -> None:
    data = Path(server_cfg.data_dir)
    for name in ("server.key", "admin.token"):
        mode = stat.S_IMODE(os.stat(data / name).st_mode)
        assert mode == 0o600, name
    # only the token's hash is stored
    assert api.token not in (data / "segd.db").read_bytes().decode("latin-1")
