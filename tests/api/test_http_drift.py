"""One HTTP kit: the same bad input answers the same status and code on the
server's API, on the orchestrator's, and on the all-in-one listener that
serves both (where the orchestrator once answered `invalid_json`/`too_large`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from segd.config import ADMIN_TOKEN_FILE, OrchestratorConfig, ServerConfig
from segd.orchestrator.app import add_routes
from segd.orchestrator.app import build_app as build_orchestrator
from segd.orchestrator.service import Orchestrator
from segd.server.app import build_app as build_server
from segd.server.app import service_of
from tests.api.conftest import ListenerTestServer

BIG = b'{"x": "' + b"a" * 70000 + b'"}'
CASES: list[tuple[str, str, str, bytes, dict[str, str], int, str]] = [
    # (name, method, route suffix, body, headers, status, code)
    ("malformed json", "POST", "", b"{", {}, 400, "malformed_json"),
    ("not utf-8", "POST", "", b'{"\xff": 1}', {}, 400, "malformed_json"),
    ("wrong shape", "POST", "", b"[]", {}, 400, "invalid_input"),
    ("too large", "POST", "", BIG, {}, 413, "body_too_large"),
    ("bad gzip", "POST", "", b"not gzip", {"Content-Encoding": "gzip"}, 400, "bad_body"),
    ("unknown query", "GET", "?nope=1", b"", {}, 400, "invalid_input"),
    ("no token", "GET", "", b"", {"Authorization": ""}, 401, "unauthorized"),
    ("wrong method", "PATCH", "", b"{}", {}, 405, "method_not_allowed"),
    ("unknown expectation", "POST", "", b"{}", {"Expect": "magic"}, 417, "expectation_failed"),
]
UNKNOWN = ("GET", "/nope", 404, "not_found")


class Target:
    def __init__(self, client: TestClient[Any, Any], token: str, prefixes: list[str]) -> None:
        self.client = client
        self.token = token
        self.prefixes = prefixes  # a POST+GET collection route of each API it serves


@pytest.fixture
async def targets(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[dict[str, Target]]:
    scfg = ServerConfig(data_dir=str(tmp_path / "server"))
    ocfg = OrchestratorConfig(data_dir=str(tmp_path / "orch"), register_local_node=False)
    server = await aiohttp_client(ListenerTestServer(build_server(scfg), scfg.connections))
    stoken = (tmp_path / "server" / ADMIN_TOKEN_FILE).read_text().strip()
    orch = await aiohttp_client(ListenerTestServer(build_orchestrator(ocfg), ocfg.connections))
    otoken = (tmp_path / "orch" / "admin.token").read_text().strip()
    # The all-in-one listener: the server's app with the orchestrator's routes.
    acfg = ServerConfig(data_dir=str(tmp_path / "all"))
    app = build_server(acfg)
    mounted = await Orchestrator.open(
        OrchestratorConfig(data_dir=str(tmp_path / "all-orch"), register_local_node=False)
    )
    add_routes(app, mounted, accept_token=lambda t: service_of(app).is_admin(t))
    both = await aiohttp_client(ListenerTestServer(app, acfg.connections))
    atoken = (tmp_path / "all" / ADMIN_TOKEN_FILE).read_text().strip()
    try:
        yield {
            "server": Target(server, stoken, ["/v1/rules"]),
            "orchestrator": Target(orch, otoken, ["/v1/orch/profiles"]),
            "allinone": Target(both, atoken, ["/v1/rules", "/v1/orch/profiles"]),
        }
    finally:
        await mounted.close()


async def _ask(t: Target, method: str, path: str, body: bytes, headers: dict[str, str]) -> Any:
    sent = {"Authorization": f"Bearer {t.token}", "Content-Type": "application/json"}
    sent.update(headers)
    if not sent["Authorization"]:
        del sent["Authorization"]
    resp = await t.client.request(method, path, data=body or None, headers=sent)
    answer = await resp.json()
    assert set(answer) == {"error", "message"} and answer["message"], answer
    return resp.status, answer["error"], resp.headers.get("WWW-Authenticate", "")


@pytest.mark.parametrize(("name", "method", "suffix", "body", "headers", "status", "code"), CASES)
async def test_the_same_bad_input_answers_the_same_code_on_every_api(
    targets: dict[str, Target],
    name: str,
    method: str,
    suffix: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    for where, t in targets.items():
        for prefix in t.prefixes:
            got = await _ask(t, method, prefix + suffix, body, headers)
            assert got[:2] == (status, code), (name, where, prefix)
            if status == 401:
                assert got[2].startswith("Bearer"), (where, prefix)


async def test_an_unknown_route_is_not_found_on_every_api(targets: dict[str, Target]) -> None:
    method, tail, status, code = UNKNOWN
    for where, t in targets.items():
        for prefix in ("/v1", "/v1/orch"):
            got = await _ask(t, method, prefix + tail, b"", {})
            assert got[:2] == (status, code), where


async def test_unknown_query_parameters_are_checked_after_authentication(
    targets: dict[str, Target],
) -> None:
    """A refused token with a typo in the query answers 401 with the realm, on
    every admin API; the same typo with the right token answers 400."""
    for where, t in targets.items():
        for prefix in t.prefixes:
            refused = await _ask(
                t, "GET", prefix + "?colour=red", b"", {"Authorization": "Bearer x"}
            )
            assert refused == (401, "unauthorized", 'Bearer realm="segd"'), (where, prefix)
            typo = await _ask(t, "GET", prefix + "?colour=red", b"", {})
            assert typo[:2] == (400, "invalid_input"), (where, prefix)


async def test_a_repeated_query_parameter_is_refused(targets: dict[str, Target]) -> None:
    """`?limit=1&limit=1000` (or `wait`, `node`…) once took the first value."""
    paths = {
        "/v1/rules": "/v1/audit?limit=1&limit=2",
        "/v1/orch/profiles": "/v1/orch/containers?node=a&node=b",
    }
    for where, t in targets.items():
        for prefix in t.prefixes:
            got = await _ask(t, "GET", paths[prefix], b"", {})
            assert got[:2] == (400, "invalid_input"), (where, prefix)
