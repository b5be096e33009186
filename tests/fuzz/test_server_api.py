"""Property-based fuzzing of every route of the server's route table.

Each example is one request drawn for a route: a body built from the route's
msgspec type and then mutated, garbage or damaged auth (bearer token, agent
signature headers), odd query strings and path parameters. `harness.exchange`
checks the answer: a 4xx {error, message} that wrote nothing, or a 2xx of the
route's type; never a 5xx, never a hang.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from segd.server.api import ROUTES
from tests.fuzz import strategies as fz
from tests.fuzz.harness import Env, Request, encode, exchange, request_for

ADMIN = [r for r in ROUTES if r.auth != "agent"]
AGENT = [r for r in ROUTES if r.auth == "agent"]
PAIR = next(r for r in ROUTES if r.path == "/v1/agent/pair")


async def _admin(env: Env, data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(ADMIN), label="route")
    await exchange(env, data.draw(request_for(env, route), label="request"))


async def _agent(env: Env, data: st.DataObject) -> None:
    route = data.draw(st.one_of(st.just(PAIR), st.sampled_from(AGENT)), label="route")
    await exchange(env, data.draw(request_for(env, route), label="request"))


async def _crossed(env: Env, data: st.DataObject) -> None:
    """Any route with the credentials of another kind of caller, or none."""
    route = data.draw(st.sampled_from(ROUTES), label="route")
    auth = data.draw(st.sampled_from(["admin", "agent", "none"]), label="auth")
    await exchange(env, data.draw(request_for(env, route, auth), label="request"))


async def _pairing(env: Env, data: st.DataObject) -> None:
    """A validly signed pairing with a good key and any addresses, labels and name:
    refused, or stored in a shape every peer's ruleset can take."""
    agent = data.draw(st.sampled_from(env.agents), label="agent")
    body: dict[str, Any] = {
        "container_id": f"c-fuzz{len(env.captured)}-{data.draw(st.integers(0, 10**9))}",
        "pairing_key": env.tokens[data.draw(st.sampled_from(["db", "web"]), label="key")],
        "ips": data.draw(st.one_of(fz.odd_ips, fz.good_ips, fz.bad_ips), label="ips"),
        "name": data.draw(st.one_of(st.just(""), fz.text), label="name"),
        "requested_labels": data.draw(
            st.one_of(st.just({}), fz.good_labels(), fz.bad_labels), label="labels"
        ),
    }
    await exchange(env, Request(PAIR, "POST", PAIR.path, encode(body), "agent", signer=agent))


@fz.fast(150)
@given(data=st.data())
async def test_admin_routes(env: Env, data: st.DataObject) -> None:
    await _admin(env, data)


@fz.fast(150)
@given(data=st.data())
async def test_agent_routes(env: Env, data: st.DataObject) -> None:
    await _agent(env, data)


@fz.fast(60)
@given(data=st.data())
async def test_whatever_a_pairing_stores_every_peer_can_render(
    env: Env, data: st.DataObject
) -> None:
    await _pairing(env, data)


@fz.fast(60)
@given(data=st.data())
async def test_routes_with_the_wrong_credentials(env: Env, data: st.DataObject) -> None:
    await _crossed(env, data)


@pytest.mark.slow
@fz.slow(3000)
@given(data=st.data())
async def test_admin_routes_long(env: Env, data: st.DataObject) -> None:
    await _admin(env, data)


@pytest.mark.slow
@fz.slow(3000)
@given(data=st.data())
async def test_agent_routes_long(env: Env, data: st.DataObject) -> None:
    await _agent(env, data)


@pytest.mark.slow
@fz.slow(1000)
@given(data=st.data())
async def test_whatever_a_pairing_stores_every_peer_can_render_long(
    env: Env, data: st.DataObject
) -> None:
    await _pairing(env, data)


@pytest.mark.slow
@fz.slow(1000)
@given(data=st.data())
async def test_routes_with_the_wrong_credentials_long(env: Env, data: st.DataObject) -> None:
    await _crossed(env, data)
