"""`GET /v1/explain` over the running server's model."""

from __future__ import annotations

import urllib.parse

import pytest

from tests.api.conftest import Admin, MakeAgent


async def explain(api: Admin, **q: str) -> tuple[int, dict[str, object]]:
    status, body = await api.call("GET", "/v1/explain?" + urllib.parse.urlencode(q))
    return status, body


async def test_explain_names_the_rule_or_why_not(api: Admin, make_agent: MakeAgent) -> None:
    db_token = await api.setup_policy(profile="db", labels={"role": "db", "app": "shop"})
    web_token = await api.setup_policy(profile="web", labels={"role": "web", "app": "shop"})
    rule = await api.ok(
        "POST",
        "/v1/rules",
        {"providers": [{"role": "db"}], "consumers": [{"role": "web"}], "services": ["tcp/5432"]},
        status=201,
    )
    a = await make_agent("host-a")
    assert (await a.pair("d" * 64, db_token, ["10.0.0.2"], name="db-1"))[0] == 200
    status, web = await a.pair("e" * 64, web_token, ["10.0.0.3"], name="/web-1")
    assert status == 200
    status, said = await explain(api, src="web-1", dst="db-1", port="5432")
    assert status == 200, said
    assert (said["verdict"], said["reason"], said["rule_id"]) == ("allowed", "rule", rule["id"])
    # the rule runs the other way, and both profiles lock role: no pairing changes that
    status, said = await explain(api, src="10.0.0.2", dst=web["workload_id"], port="5432")
    assert (said["verdict"], said["reason"]) == ("blocked", "locked_label")
    status, said = await explain(api, src="web-1", dst="db-1", port="5432", proto="udp")
    assert said["reason"] == "no_rule" and said["proto"] == "udp"
    # a container refused a pairing is isolated
    status, _ = await a.pair("f" * 64, "segd1.forged", ["10.0.0.9"])
    assert status in (400, 401, 403)
    status, said = await explain(api, src="10.0.0.9", dst="db-1", port="5432")
    assert (said["verdict"], said["reason"]) == ("blocked", "src_unpaired")
    # workload modes are in effect
    await api.ok("PUT", "/v1/profiles/db/mode", {"mode": "idle"})
    status, said = await explain(api, src="10.0.0.3", dst="db-1", port="5432")
    assert (said["verdict"], said["reason"]) == ("allowed", "mode_idle")


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ({"src": "10.0.0.1", "dst": "10.0.0.2"}, 400),
        ({"src": "10.0.0.1", "port": "80"}, 400),
        ({"src": "10.0.0.1", "dst": "10.0.0.2", "port": "0"}, 400),
        ({"src": "10.0.0.1", "dst": "10.0.0.2", "port": "80/sctp"}, 400),
        ({"src": "10.0.0.1", "dst": "10.0.0.2", "port": "80", "proto": "x"}, 400),
        ({"src": "nobody", "dst": "10.0.0.2", "port": "80"}, 404),
        ({"src": "10.0.0.1", "dst": "10.0.0.2", "port": "80", "extra": "1"}, 400),
    ],
)
async def test_bad_explain_queries(api: Admin, query: dict[str, str], status: int) -> None:
    got, body = await explain(api, **query)
    assert got == status, body
    assert set(body) == {"error", "message"}
