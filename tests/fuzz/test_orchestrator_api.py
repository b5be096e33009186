"""The orchestrator's API under fuzz: every route of its table, in process, on a
fake Docker engine; and schemathesis against its OpenAPI document on a live
listener.

Invariants as for the server: a refusal is a 4xx `{"error", "message"}` on
one line that changed nothing (profiles, nodes, containers, the engine's
containers); a success is the route's status and answer type. A 502/503 is
allowed only where a node is involved and named as the cause.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import requests
import schemathesis
import yarl
from aiohttp.test_utils import TestClient
from hypothesis import event, given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from segd.config import OrchestratorConfig
from segd.orchestrator.api import ROUTES, Route
from segd.orchestrator.app import OrchestratorServer, build_app
from tests.fuzz import strategies as fz
from tests.fuzz.harness import (
    FUZZ_BURST,
    LABEL_VALUE,
    NAME,
    can_be_invalid,
    check_error,
    route_matcher,
    run_examples,
)
from tests.orchestrator.conftest import KEY, KEY2, profile_body
from tests.orchestrator.fake_engine import FakeEngine

NODE_CODES = {"node_unreachable", "docker_error", "unavailable"}
DOCKER_ROUTES = {"run", "ps", "rm", "change"}
TIMEOUT_S = 40.0  # the orchestrator's own Docker timeout is 30 s


@dataclass
class Orch:
    client: TestClient[Any, Any]
    token: str
    engine: FakeEngine
    ids: dict[str, list[str]] = field(default_factory=dict)

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        hdrs = {"Authorization": f"Bearer {self.token}"}
        data = None if body is None else json.dumps(body).encode()
        async with self.client.request(method, path, data=data, headers=hdrs) as r:
            raw = await r.read()
            return r.status, (json.loads(raw) if raw else None)

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        got, answer = await self.call(method, path, body)
        assert got == status, (got, answer)
        return answer

    async def state(self) -> dict[str, Any]:
        return {
            "profiles": await self.ok("GET", "/v1/orch/profiles"),
            "nodes": await self.ok("GET", "/v1/orch/nodes"),
            "containers": await self.ok("GET", "/v1/orch/containers"),
            "engine": sorted((c.id, c.state) for c in self.engine.containers.values()),
        }

    async def refresh(self) -> None:
        s = await self.state()
        self.ids = {
            "name": [p["name"] for p in s["profiles"]] + [n["name"] for n in s["nodes"]],
            "id": [c["id"] for c in s["containers"]] + [c["id"][:12] for c in s["containers"]],
        }


@pytest.fixture
async def orch(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Orch]:
    sock_dir = Path(tempfile.mkdtemp(prefix="segd-f-", dir="/tmp"))
    engine = FakeEngine()
    await engine.start(str(sock_dir / "docker.sock"))
    try:
        data = tmp_path / "orch"
        cfg = OrchestratorConfig(
            data_dir=str(data), register_local_node=False, rate_limit_burst=FUZZ_BURST
        )
        client = await aiohttp_client(build_app(cfg))
        o = Orch(client, (data / "admin.token").read_text().strip(), engine)
        await o.ok(
            "POST", "/v1/orch/nodes", {"name": "fake", "endpoint": "unix://" + engine.socket}, 201
        )
        await o.ok("POST", "/v1/orch/profiles", profile_body(), 201)
        await o.ok(
            "POST",
            "/v1/orch/profiles",
            profile_body("db", pairing_key=KEY2, labels={"role": "db"}),
            201,
        )
        await o.ok("POST", "/v1/orch/run", {"profile": "web"}, 201)
        await o.refresh()
        yield o
    finally:
        await engine.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


# ---- requests --------------------------------------------------------------------------


def hints(o: Orch) -> tuple[fz.Hints, fz.Hints]:
    names = sorted(set(o.ids["name"]) | {"web", "db", "fake"})
    fresh = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
    good: dict[str, st.SearchStrategy[Any]] = {
        "name": st.one_of(fresh, fz.pick(names)),
        "profile": st.sampled_from(["web", "db", "web"]),
        "node": st.one_of(st.none(), st.just("fake")),
        "image": st.sampled_from(["segd-busybox:latest", "segd-busybox:latest", "nope:1"]),
        "pairing_key": st.sampled_from([KEY, KEY2]),
        "command": st.lists(st.sampled_from(["sh", "-c", "sleep 1", "a b"]), max_size=3),
        "env": st.dictionaries(
            st.from_regex(r"[A-Z_][A-Z0-9_]{0,6}", fullmatch=True), st.text(max_size=8), max_size=2
        ),
        "networks": st.one_of(st.just([]), st.just(["bridge"]), st.just(["none"])),
        "labels": fz.good_labels(),
        "description": st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
        "endpoint": st.sampled_from(
            ["unix://" + o.engine.socket, "unix:///nonexistent/docker.sock"]
        ),
        "tls_cert": st.just(""),
        "tls_key": st.just(""),
        "tls_ca": st.just(""),
        "count": st.integers(1, 3),
    }
    bad: dict[str, st.SearchStrategy[Any]] = {
        "name": st.one_of(fz.near(fresh), fz.text),
        "profile": st.one_of(fz.near(st.just("web")), fz.text),
        "node": st.one_of(fz.near(st.just("fake")), fz.text),
        "image": st.one_of(fz.near(st.just("segd-busybox:latest")), fz.text),
        "pairing_key": st.one_of(fz.near(st.just(KEY)), st.just(""), st.just("k" * 4097), fz.text),
        "command": st.one_of(
            st.lists(st.just("x"), min_size=257, max_size=257), st.just(["a\x00"])
        ),
        "env": st.one_of(st.just({"1A": "x"}), st.just({"A": "\x00"}), st.just({"A\n": "x"})),
        "networks": st.sampled_from(
            [["host"], ["none", "bridge"], ["a"] * 9, ["bridge", "bridge"], ["a b"]]
        ),
        "labels": fz.bad_labels,
        "description": st.one_of(st.just("x" * 501), st.just("a\x7f"), fz.text),
        "endpoint": st.one_of(
            fz.near(st.just("unix:///var/run/docker.sock")),
            st.sampled_from(
                ["unix://relative", "tcp://h:0", "tcp://h:99999", "http://h:1", "tcp://h"]
            ),
            fz.text,
        ),
        "tls_cert": st.sampled_from(["relative.pem", "/a\n", "/nonexistent.pem"]),
        "count": st.sampled_from([0, -1, 51, 2**63]),
    }
    return good, bad


_PARAM_RE = re.compile(r"\{([a-z_]+)\}")


@st.composite
def request_for(
    draw: st.DrawFn, o: Orch, route: Route
) -> tuple[str, str, bytes, dict[str, str], str]:
    """(method, path with query, body, headers, auth) for a request to `route`."""

    def fill(m: re.Match[str]) -> str:
        known = o.ids.get(m.group(1), [])
        return str(draw(st.one_of(fz.path_value, fz.pick(known or ["x"]))))

    path = _PARAM_RE.sub(fill, route.path)
    pairs = [
        (q.name, draw(st.one_of(st.just("fake"), fz.query_value)))
        for q in route.query
        if draw(st.booleans())
    ]
    if draw(st.integers(0, 9)) == 0:
        pairs.append((draw(st.sampled_from(["x", "node", "%FF"])), draw(fz.query_value)))
    if pairs:
        path += "?" + "&".join(f"{k}={v}" for k, v in pairs)
    if route.body is None:
        body = draw(st.one_of(st.just(b""), st.binary(max_size=32)))
    else:
        valid = draw(fz.body(route.body, *hints(o)))
        fields = tuple(f.encode_name for f in msgspec.structs.fields(route.body))
        body = (
            json.dumps(valid).encode() if draw(st.booleans()) else draw(fz.mutated(valid, fields))
        )
    auth = draw(
        st.one_of(st.just("valid"), st.sampled_from(["valid", "missing", "garbage", "truncated"]))
    )
    header = {
        "valid": f"Bearer {o.token}",
        "missing": None,
        "garbage": f"Bearer {draw(fz.header_text)}",
        "truncated": f"Bearer {o.token[:-1]}",
    }[auth]
    headers = {} if header is None else {"Authorization": header}
    method = (
        route.method
        if draw(st.integers(0, 14))
        else draw(st.sampled_from(["PUT", "PATCH", "GET", "HEAD"]))
    )
    return method, path, body, headers, auth


_route = route_matcher(ROUTES)


def check_orch_stored(s: dict[str, Any]) -> None:
    for p in s["profiles"]:
        assert NAME.fullmatch(p["name"]), p
        assert all(LABEL_VALUE.fullmatch(v) for v in p["labels"].values()), p
        assert "\n" not in p["image"] and "\x00" not in json.dumps(p), p
        assert p["pairing_key"].endswith("(masked)"), p
    for n in s["nodes"]:
        assert NAME.fullmatch(n["name"]), n


async def exchange(
    o: Orch, method: str, path: str, body: bytes, headers: dict[str, str], auth: str
) -> None:
    before = await o.state()

    async def go() -> tuple[int, bytes]:
        url = yarl.URL(path, encoded=True)
        async with o.client.request(method, url, data=body, headers=headers) as r:
            return r.status, await r.read()

    status, raw = await asyncio.wait_for(go(), TIMEOUT_S)
    route = _route(method, path)
    code = ""
    if status >= 400 and method != "HEAD":
        code = check_error(status, raw)["error"] if status < 500 else json.loads(raw)["error"]
    event(f"{method} {route.path if route else '?'} -> {status} {code}".rstrip())
    if status >= 500:
        assert status in (502, 503) and code in NODE_CODES, (status, raw[:300])
        assert route is not None and route.handler.__name__ in DOCKER_ROUTES, (status, raw[:300])
    elif status >= 300 or method in ("GET", "HEAD"):
        if method != "GET" or status >= 300:
            assert await o.state() == before, (
                f"a refused request ({status} {code}) changed something"
            )
    else:
        assert route is not None and (auth == "valid" or route.auth == "none"), status
        if status == 204:
            assert route.response is None and raw == b""
        else:
            assert status == route.status, (status, route.status)
            msgspec.json.decode(raw, type=route.response)
        check_orch_stored(await o.state())
        await o.refresh()


@fz.fast(150)
@given(data=st.data())
async def test_orchestrator_routes(orch: Orch, data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(ROUTES), label="route")
    await exchange(orch, *data.draw(request_for(orch, route), label="request"))


@pytest.mark.slow
@fz.slow(3000)
@given(data=st.data())
async def test_orchestrator_routes_long(orch: Orch, data: st.DataObject) -> None:
    route = data.draw(st.sampled_from(ROUTES), label="route")
    await exchange(orch, *data.draw(request_for(orch, route), label="request"))


@pytest.mark.parametrize(
    "value", ["web\n", "x'; DROP TABLE profiles; --", "$(reboot)", "} ; flush ruleset", "a\x00"]
)
async def test_hostile_values_never_reach_a_container(orch: Orch, value: str) -> None:
    """Names, labels, images, networks and keys with shell, SQL or nft syntax are refused."""
    before = await orch.state()
    for over in (
        {"name": value},
        {"labels": {"role": value}},
        {"labels": {value: "x"}},
        {"image": value},
        {"networks": [value]},
        {
            "pairing_key": value
            if " " in value or "\x00" in value or "\n" in value
            else value + "\n"
        },
        {"env": {value: "x"}},
    ):
        status, answer = await orch.call(
            "POST", "/v1/orch/profiles", {**profile_body("p-new"), **over}
        )
        assert status == 400, (over, answer)
        check_error(status, json.dumps(answer).encode())
    status, _ = await orch.call("POST", "/v1/orch/run", {"profile": value})
    assert status in (400, 404)
    assert await orch.state() == before


async def test_an_unknown_expectation_is_a_json_417(orch: Orch) -> None:
    srv = orch.client.server
    reader, writer = await asyncio.open_connection(srv.host, srv.port)
    writer.write(
        f"GET /v1/orch/profiles HTTP/1.1\r\nHost: o\r\nConnection: close\r\n"
        f"Authorization: Bearer {orch.token}\r\nExpect: magic\r\n\r\n".encode()
    )
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 417"), raw[:200]
    assert check_error(417, body)["error"] == "expectation_failed"


@pytest.mark.parametrize("value", [b"Bearer \xff\xfe", b"Bearer \xc3\xa9"])
async def test_undecodable_token_bytes_are_a_401(orch: Orch, value: bytes) -> None:
    srv = orch.client.server
    reader, writer = await asyncio.open_connection(srv.host, srv.port)
    writer.write(
        b"GET /v1/orch/profiles HTTP/1.1\r\nHost: o\r\nConnection: close\r\nAuthorization: "
        + value
        + b"\r\n\r\n"
    )
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), raw[:200]
    check_error(401, body)


async def test_a_body_that_is_not_utf8_is_a_400(orch: Orch) -> None:
    raw = json.dumps(profile_body("p-u")).encode().replace(b'"p-u"', b'"p-\xff"')
    hdrs = {"Authorization": f"Bearer {orch.token}"}
    async with orch.client.post("/v1/orch/profiles", data=raw, headers=hdrs) as r:
        assert r.status == 400
        check_error(400, await r.read())


# ---- schemathesis against a live orchestrator ----------------------------------------


class LiveOrch:
    """The orchestrator on a loopback port and a fake engine, in their own thread."""

    def __init__(self, data_dir: Path, sock_dir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.cfg = OrchestratorConfig(
            data_dir=str(data_dir),
            listen=f"127.0.0.1:{self.port}",
            register_local_node=False,
            rate_limit_burst=FUZZ_BURST,
        )
        self.socket = str(sock_dir / "docker.sock")
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            engine = FakeEngine()
            await engine.start(self.socket)
            server = OrchestratorServer(self.cfg, shutdown_timeout=2.0)
            try:
                await server.start()
                self._ready.set()
                await self._stop.wait()
            finally:
                await server.stop()
                await engine.stop()

        try:
            asyncio.run(main())
        except BaseException as e:
            self._error = e
            self._ready.set()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"live orchestrator did not start: {self._error!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def token(self) -> str:
        return (Path(self.cfg.data_dir) / "admin.token").read_text().strip()


@dataclass
class OrchStack:
    live: LiveOrch
    schema: Any
    session: requests.Session
    auth: dict[str, str]


@pytest.fixture(scope="module")
def orch_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrchStack]:
    sock_dir = Path(tempfile.mkdtemp(prefix="segd-s-", dir="/tmp"))
    live = LiveOrch(tmp_path_factory.mktemp("orch-st") / "orch", sock_dir)
    live.start()
    try:
        session = requests.Session()
        auth = {"Authorization": f"Bearer {live.token}"}
        for path, body in (
            ("/v1/orch/nodes", {"name": "fake", "endpoint": "unix://" + live.socket}),
            ("/v1/orch/profiles", profile_body()),
        ):
            r = session.post(live.url + path, json=body, headers=auth, timeout=TIMEOUT_S)
            assert r.status_code == 201, r.text
        schema = schemathesis.openapi.from_url(f"{live.url}/v1/orch/openapi.json")
        yield OrchStack(live, schema, session, auth)
    finally:
        live.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def _st_check(stack: OrchStack, route: Route, case: Any) -> None:
    response = case.call_and_validate(
        base_url=stack.live.url,
        session=stack.session,
        headers=stack.auth if route.auth != "none" else None,
        excluded_checks=[positive_data_acceptance],
        timeout=TIMEOUT_S,
    )
    status = response.status_code
    if status >= 500:
        assert status in (502, 503) and route.handler.__name__ in DOCKER_ROUTES, response.text
        assert response.json()["error"] in NODE_CODES, response.text
    elif status >= 400 and case.method.upper() != "HEAD":
        check_error(status, response.content)
    if route.handler.__name__ == "add_node" and status == 201:
        # A node elsewhere (tcp://...) would make later requests wait for it: drop it.
        name = response.json()["name"]
        stack.session.delete(
            f"{stack.live.url}/v1/orch/nodes/{name}", headers=stack.auth, timeout=TIMEOUT_S
        )


def run_operation(stack: OrchStack, route: Route, examples: int, derandomize: bool) -> None:
    operation = stack.schema[route.path][route.method]
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if can_be_invalid(route) else [])
    for mode in modes:
        run_examples(
            operation.as_strategy(generation_mode=mode),
            examples,
            derandomize,
            lambda case: _st_check(stack, route, case),
        )


def test_the_orchestrator_document_lists_every_route(orch_stack: OrchStack) -> None:
    doc = orch_stack.session.get(
        f"{orch_stack.live.url}/v1/orch/openapi.json", timeout=TIMEOUT_S
    ).json()
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == {(r.method, r.path) for r in ROUTES}


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_schemathesis_orchestrator(orch_stack: OrchStack, route: Route) -> None:
    run_operation(orch_stack, route, 6, derandomize=True)


@pytest.mark.slow
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_schemathesis_orchestrator_long(orch_stack: OrchStack, route: Route) -> None:
    run_operation(orch_stack, route, 200, derandomize=False)
