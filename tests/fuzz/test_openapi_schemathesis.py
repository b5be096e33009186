"""schemathesis against the server's own OpenAPI document, every operation.

A real server listens on a loopback port (in a thread); schemathesis reads
`/v1/openapi.json` from it and sends schema-valid and schema-invalid requests
to every operation: admin ones with the bearer token, agent ones both unsigned
(a clean 401) and signed by a registered agent over the exact bytes sent.
Checks: schemathesis's own (no 5xx, documented status codes, content types and
response schemas, schema-invalid input refused, auth enforced) and ours (every
error is `{"error", "message"}` with a one-line message).

Left out: schemathesis's "schema-valid input is accepted". The server refuses
some documented-valid requests by design (a label dimension the server is not
configured with, locked dimensions missing from the labels, an existing name,
an unknown activation code or pairing key), which a JSON schema cannot say.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import requests
import schemathesis
from hypothesis import event
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from segd import crypto
from segd.server.api import ROUTES, Route
from tests.api.conftest import LiveServer, start_live_server
from tests.fuzz.harness import (
    FUZZ_BURST,
    ROTATE_TOKEN,
    can_be_invalid,
    check_error,
    run_examples,
)

TIMEOUT_S = 15.0
# A live stream (server-sent events) never ends: the client stops reading once
# the stream has been quiet this long, after its opening comment.
STREAM_READ_S = 2.0
EVENT_STREAM = "text/event-stream"


class Stack:
    """A live server, its OpenAPI schema as schemathesis loaded it, an agent."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.url = server.url
        self.token = server.token
        self.session = requests.Session()
        self.schema = schemathesis.openapi.from_url(f"{self.url}/v1/openapi.json")
        self.schema.config.generation.update(
            # Unknown query parameters are refused with a 400; that is pinned by
            # test_unknown_query_parameters_are_refused in test_protocol.py.
            allow_extra_parameters=False,
        )
        self.agent_key = nacl.signing.SigningKey.generate()
        self.host_id = self._register()

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        r = self.session.request(
            method,
            self.url + path,
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=TIMEOUT_S,
        )
        assert r.status_code < 300, (r.status_code, r.text)
        return r.json() if r.content else None

    def _register(self) -> str:
        code = self.admin("POST", "/v1/activation-codes", {})["code"]
        self.admin("POST", "/v1/profiles", {"name": "db", "labels": {"role": "db"}})
        self.admin("POST", "/v1/keys", {"profile": "db"})
        body = {
            "activation_code": code,
            "public_key": crypto.b64e(bytes(self.agent_key.verify_key)),
            "hostname": "st-host",
        }
        r = self.session.post(self.url + "/v1/agent/register", json=body, timeout=TIMEOUT_S)
        assert r.status_code == 201, r.text
        return str(r.json()["host_id"])

    def credentials(self, case: Any, route: Route, signed: bool) -> dict[str, str]:
        """The headers that authenticate this case: the bearer token, or a
        signature over the exact bytes schemathesis will send."""
        if route.auth == "admin":
            return {"Authorization": f"Bearer {self.token}"}
        if route.auth != "agent" or not signed:
            return {}
        kwargs = case.as_transport_kwargs(base_url=self.url)
        prepared = requests.Request(
            method=kwargs["method"],
            url=kwargs["url"],
            headers=kwargs.get("headers"),
            params=kwargs.get("params"),
            json=kwargs.get("json"),
            data=kwargs.get("data"),
            cookies=kwargs.get("cookies"),
        ).prepare()
        raw = prepared.body or b""
        body = raw.encode() if isinstance(raw, str) else raw
        assert isinstance(body, bytes)
        now = time.time()
        method, path = prepared.method or "", prepared.path_url
        return crypto.sign_request(self.agent_key, self.host_id, method, path, body, now)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data = Path(tmp_path_factory.mktemp("schemathesis")) / "server"
    server = start_live_server(data, longpoll_timeout_s=1.0, rate_limit_burst=FUZZ_BURST)
    try:
        yield Stack(server)
    finally:
        server.stop()


def _check(stack: Stack, route: Route, case: Any, signed: bool) -> None:
    headers = stack.credentials(case, route, signed)
    if route.auth == "agent" and not signed:
        for name in [h for h in case.headers or {} if h.lower().startswith("x-segd-")]:
            del case.headers[name]
        response = case.call(base_url=stack.url, session=stack.session, timeout=TIMEOUT_S)
        assert response.status_code == 401, (response.status_code, response.text[:500])
        assert check_error(response.status_code, response.content)["error"] == "unsigned_request"
        return
    response = case.call_and_validate(
        base_url=stack.url,
        session=stack.session,
        headers=headers,
        excluded_checks=[positive_data_acceptance],
        timeout=STREAM_READ_S if route.media == EVENT_STREAM else TIMEOUT_S,
    )
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if route.media == EVENT_STREAM and response.status_code == 200:
        assert response.content.startswith(b": segd flows\n\n"), response.content[:200]
    if route.path == ROTATE_TOKEN and response.status_code == 200:
        stack.token = response.json()["token"]
    code = ""
    if response.status_code >= 400 and case.method.upper() != "HEAD":
        code = check_error(response.status_code, response.content)["error"]
    event(f"{route.method} {route.path} -> {response.status_code} {code}".rstrip())


def run_operation(stack: Stack, route: Route, examples: int, *, derandomize: bool) -> None:
    operation = stack.schema[route.path][route.method]
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if can_be_invalid(route) else [])
    for mode in modes:
        for signed in (True, False) if route.auth == "agent" else (True,):
            run_examples(
                operation.as_strategy(generation_mode=mode),
                examples,
                derandomize,
                functools.partial(_check, stack, route, signed=signed),
            )


def test_the_document_lists_every_route(stack: Stack) -> None:
    doc = json.loads(requests.get(f"{stack.url}/v1/openapi.json", timeout=TIMEOUT_S).content)
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == {(r.method, r.path) for r in ROUTES}


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_schemathesis(stack: Stack, route: Route) -> None:
    run_operation(stack, route, 8, derandomize=True)


@pytest.mark.slow
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_schemathesis_long(stack: Stack, route: Route) -> None:
    run_operation(stack, route, 300, derandomize=False)


def test_the_document_can_name_the_configured_dimensions() -> None:
    """`build_app` could pass `dimensions=cfg.dimensions`: label sets then list
    exactly the dimensions the server takes, and nothing it refuses is valid."""
    from segd.server import openapi

    doc = openapi.build(ROUTES, dimensions=("tier", "zone"))
    profile = doc["components"]["schemas"]["ProfileIn"]["properties"]
    assert profile["labels"]["propertyNames"] == {"enum": ["tier", "zone"]}
    assert profile["labels"]["maxProperties"] == 2
    assert profile["locked"]["items"]["enum"] == ["tier", "zone"]
    rule = doc["components"]["schemas"]["RuleIn"]["properties"]
    assert rule["providers"]["anyOf"][0]["items"]["propertyNames"] == {"enum": ["tier", "zone"]}
    plain = openapi.build(ROUTES)["components"]["schemas"]["ProfileIn"]["properties"]
    assert "pattern" in plain["labels"]["propertyNames"]
