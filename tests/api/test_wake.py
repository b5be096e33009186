"""Only hosts whose instructions changed are woken."""

from __future__ import annotations

import asyncio

from tests.api.conftest import Admin, MakeAgent


async def test_pairing_wakes_affected_hosts_only(api: Admin, make_agent: MakeAgent) -> None:
    await api.ok(
        "POST",
        "/v1/rules",
        {"providers": [{"role": "db"}], "consumers": [{"role": "web"}], "services": ["tcp/5432"]},
        status=201,
    )
    db_key = await api.setup_policy(profile="db", labels={"role": "db"})
    web_key = await api.setup_policy(profile="web", labels={"role": "web"})
    other_key = await api.setup_policy(profile="other", labels={"role": "batch"})
    a, b, c = await make_agent("a"), await make_agent("b"), await make_agent("c")
    for agent in (a, b, c):  # mesh addresses: every host may see them
        await agent.join_mesh()
    _, on_b = await b.pair("web1", web_key, [b.ip(2)])
    _, on_c = await c.pair("batch1", other_key, [c.ip(3)])
    vb = (await b.paired(on_b)).version
    vc = (await c.paired(on_c)).version

    wait_b = asyncio.create_task(b.instructions(since=vb, wait=5))
    wait_c = asyncio.create_task(c.instructions(since=vc, wait=1.5))
    await asyncio.sleep(0.1)  # both long-polls are parked
    assert not wait_b.done() and not wait_c.done()

    status, res = await a.pair("db1", db_key, [a.ip(1)])
    assert status == 200, res

    status_b, signed_b = await asyncio.wait_for(wait_b, 2)
    assert status_b == 200
    ib = b.open(signed_b)
    assert ib.version == res["version"] > vb  # the generation of that one commit
    assert [a.ip(1)] in ib.sets.values()  # B's web workload may now reach the new db

    assert not wait_c.done()  # still parked after B was woken
    status_c, body_c = await wait_c
    assert (status_c, body_c) == (204, None)  # C is unrelated: not woken, it timed out
    hosts = {h["id"]: h["instructions_version"] for h in await api.ok("GET", "/v1/hosts")}
    assert hosts[c.host_id] == vc


async def test_rule_change_wakes_only_hosts_whose_content_changed(
    api: Admin, make_agent: MakeAgent
) -> None:
    web_key = await api.setup_policy(profile="web", labels={"role": "web"})
    other_key = await api.setup_policy(profile="other", labels={"role": "batch"})
    b, c = await make_agent("b"), await make_agent("c")
    _, on_b = await b.pair("web1", web_key, ["10.0.0.2"])
    _, on_c = await c.pair("batch1", other_key, ["10.0.0.3"])
    vb = (await b.paired(on_b)).version
    vc = (await c.paired(on_c)).version
    wait_b = asyncio.create_task(b.instructions(since=vb, wait=5))
    wait_c = asyncio.create_task(c.instructions(since=vc, wait=0.5))
    await asyncio.sleep(0.1)
    rule = {"providers": "any", "consumers": [{"role": "web"}], "services": ["tcp/443"]}
    await api.ok("POST", "/v1/rules", rule, status=201)
    # B's web workload gets an outbound allow; C's batch workload is a provider of `any`
    # too, so it gets an inbound allow from the web set: both change here.
    status_b, signed_b = await asyncio.wait_for(wait_b, 2)
    status_c, signed_c = await wait_c
    assert (status_b, status_c) == (200, 200)
    # one commit: one generation for both
    assert b.open(signed_b).version == c.open(signed_c).version > max(vb, vc)
    # A rule that matches nobody changes nothing and wakes nobody.
    wait_b = asyncio.create_task(b.instructions(since=b.open(signed_b).version, wait=1.0))
    await asyncio.sleep(0.05)
    nobody = {
        "providers": [{"role": "ghost"}],
        "consumers": [{"role": "ghost"}],
        "services": ["udp/53"],
    }
    await api.ok("POST", "/v1/rules", nobody, status=201)
    assert not wait_b.done()
    assert (await wait_b)[0] == 204
