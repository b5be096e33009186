"""The orchestrator API in process: a temp data dir, and a fake Docker engine on a
unix socket (spoken to by the real aiodocker client) for run/ps/rm/change."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import stat
import time
import zlib
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from segd.config import OrchestratorConfig
from segd.orchestrator import wire
from segd.orchestrator.app import add_routes
from segd.orchestrator.service import Orchestrator
from tests.orchestrator.conftest import (
    KEY,
    KEY2,
    Api,
    ApiFactory,
    pairing_key,
    profile_body,
    soon,
    wait_past,
)
from tests.orchestrator.fake_engine import FakeEngine

ROUTES = [
    ("POST", "/v1/orch/profiles"),
    ("GET", "/v1/orch/profiles"),
    ("DELETE", "/v1/orch/profiles/web"),
    ("PUT", "/v1/orch/profiles/web/key"),
    ("POST", "/v1/orch/nodes"),
    ("GET", "/v1/orch/nodes"),
    ("DELETE", "/v1/orch/nodes/local"),
    ("POST", "/v1/orch/run"),
    ("GET", "/v1/orch/containers"),
    ("DELETE", "/v1/orch/containers/abcd"),
    ("POST", "/v1/orch/containers/abcd/change"),
]


def _is_error(body: Any) -> bool:
    return isinstance(body, dict) and set(body) == {"error", "message"} and bool(body["message"])


# ---- health, auth, the admin token --------------------------------------------------


async def test_health_needs_no_token(api: Api) -> None:
    resp = await api.client.get("/v1/health")
    assert resp.status == 200
    assert (await resp.json())["status"] == "ok"


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic abc", "Bearer "])
async def test_every_route_needs_the_admin_token(
    api: Api, method: str, path: str, header: str | None
) -> None:
    headers = {} if header is None else {"Authorization": header}
    resp = await api.client.request(method, path, json={}, headers=headers)
    assert resp.status == 401
    assert _is_error(await resp.json())
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_requests_without_a_good_token_are_rate_limited_per_source(
    make_api: ApiFactory,
) -> None:
    api = await make_api(register_local_node=False, rate_limit_per_s=0.5, rate_limit_burst=3)
    answers = []
    for path, headers in [
        ("/v1/health", {}),
        ("/v1/orch/openapi.json", {}),
        ("/v1/orch/profiles", {"Authorization": "Bearer wrong"}),
        ("/v1/orch/profiles", {}),
        ("/v1/health", {}),
    ]:
        resp = await api.client.get(path, headers=headers)
        answers.append((resp.status, resp.headers.get("Retry-After"), await resp.json()))
    assert [(s, r) for s, r, _ in answers] == [
        (200, None),
        (200, None),
        (401, None),
        (429, "2"),
        (429, "1"),  # the first refusal was held back for a second
    ]
    assert _is_error(answers[3][2]) and answers[3][2]["error"] == "rate_limited"
    for _ in range(10):  # the admin token is never limited, from the same address
        assert (await api.call("GET", "/v1/orch/profiles"))[0] == 200


def _files(data_dir: Path) -> tuple[int, int, bytes]:
    token_mode = stat.S_IMODE((data_dir / "admin.token").stat().st_mode)
    dir_mode = stat.S_IMODE(data_dir.stat().st_mode)
    db = b"".join(p.read_bytes() for p in data_dir.glob("orchestrator.db*"))
    return token_mode, dir_mode, db


async def test_admin_token_file_is_private_and_only_its_hash_is_stored(
    api: Api, data_dir: Path
) -> None:
    token_mode, dir_mode, db = _files(data_dir)
    assert (token_mode, dir_mode) == (0o600, 0o700)
    assert api.token.encode() not in db
    assert hashlib.sha256(api.token.encode()).hexdigest().encode() in db


async def test_admin_token_survives_a_restart(data_dir: Path) -> None:
    cfg = OrchestratorConfig(data_dir=str(data_dir))
    first = await Orchestrator.open(cfg)
    token = first.token_file.read_text().strip()
    mtime = first.token_file.stat().st_mtime_ns
    await first.close()
    second = await Orchestrator.open(cfg)
    try:
        assert second.check_token(token)
        assert not second.check_token(token + "x")
        assert second.token_file.stat().st_mtime_ns == mtime
    finally:
        await second.close()


async def test_second_orchestrator_on_the_same_data_dir_is_refused(api: Api) -> None:
    with pytest.raises(Exception, match="another segd orchestrator"):
        await Orchestrator.open(api.cfg)


async def test_unknown_route_and_wrong_method_answer_json(api: Api) -> None:
    status, body = await api.call("GET", "/v1/orch/nope")
    assert status == 404 and _is_error(body)
    status, body = await api.call("PUT", "/v1/orch/profiles")
    assert status == 405 and _is_error(body)


async def _raw(api: Api, data: bytes) -> tuple[int, Any, bytes]:
    """Send bytes on a new connection; (status, JSON body, raw answer)."""
    srv = api.client.server
    reader, writer = await asyncio.open_connection(srv.host, srv.port)
    try:
        writer.write(data)
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body), raw


def _post_profiles(api: Api, headers: bytes, body: bytes) -> bytes:
    return (
        b"POST /v1/orch/profiles HTTP/1.1\r\nHost: o\r\nConnection: close\r\n"
        + f"Authorization: Bearer {api.token}\r\n".encode()
        + headers
        + b"\r\n"
        + body
    )


_PROFILE = json.dumps(profile_body()).encode()
_GZ, _DEFLATE = gzip.compress(_PROFILE), zlib.compress(_PROFILE)
BROKEN_BODIES = [
    ("gzip", _GZ[:10] + b"\xff" * 10 + _GZ[20:]),  # corrupt
    ("gzip", _GZ[:-8]),  # cut short
    ("deflate", _DEFLATE[:2] + b"\xff" * 8),
    ("deflate", _DEFLATE[:-4]),
]


@pytest.mark.parametrize(
    ("encoding", "body"),
    BROKEN_BODIES,
    ids=["corrupt gzip", "truncated gzip", "corrupt deflate", "truncated deflate"],
)
async def test_a_malformed_gzip_or_truncated_body_is_a_400_not_a_500(
    api: Api, encoding: str, body: bytes
) -> None:
    headers = f"Content-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n".encode()
    status, answer, raw = await _raw(api, _post_profiles(api, headers, body))
    assert (status, answer["error"]) == (400, "bad_body"), raw
    assert _is_error(answer)
    assert (await api.call("GET", "/v1/orch/profiles"))[1] == []


@pytest.mark.parametrize(
    "data",
    [
        b"GET /v1/orch/profiles HTTP/1.1\r\nHost: o\r\nX-A: " + b"a" * 20_000 + b"\r\n\r\n",
        b"POST /v1/orch/profiles HTTP/1.1\r\nHost: o\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"GET /v1/\xc3\xa9 HTTP/1.1\r\nHost: o\r\n\r\n",
        b"POST /v1/orch/profiles HTTP/1.1\r\nHost: o\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}x\r\n0\r\n\r\n",
    ],
    ids=["header too long", "chunked and content-length", "non-ASCII request line", "bad chunk"],
)
async def test_what_the_parser_refuses_is_answered_as_json(api: Api, data: bytes) -> None:
    status, answer, raw = await _raw(api, data)
    assert status == 400 and _is_error(answer), raw
    assert b"content-type: application/json" in raw.lower()


@pytest.mark.parametrize("encoding", [b"br", b"zstd", b"x-nonsense"])
async def test_an_unsupported_content_encoding_is_a_json_415(api: Api, encoding: bytes) -> None:
    headers = b"Content-Encoding: " + encoding + b"\r\nContent-Length: 2\r\n"
    status, answer, raw = await _raw(api, _post_profiles(api, headers, b"{}"))
    assert (status, answer["error"]) == (415, "unsupported_media_type"), raw


# ---- nodes --------------------------------------------------------------------------


async def test_local_node_registered_on_first_start_only(make_api: ApiFactory) -> None:
    api = await make_api()
    status, nodes = await api.call("GET", "/v1/orch/nodes")
    assert status == 200
    assert [(n["name"], n["endpoint"]) for n in nodes] == [("local", "unix:///var/run/docker.sock")]
    assert (await api.call("DELETE", "/v1/orch/nodes/local"))[0] == 204
    await api.client.close()
    again = await make_api()  # a restart on the same data dir
    assert (await again.call("GET", "/v1/orch/nodes"))[1] == []


async def test_local_node_not_registered_when_config_says_so(api: Api) -> None:
    assert (await api.call("GET", "/v1/orch/nodes"))[1] == []


async def test_node_add_list_remove(api: Api, tmp_path: Path) -> None:
    status, node = await api.call(
        "POST", "/v1/orch/nodes", {"name": "edge1", "endpoint": "tcp://10.0.0.5:2375"}
    )
    assert status == 201
    assert node["name"] == "edge1" and node["endpoint"] == "tcp://10.0.0.5:2375"
    status, body = await api.call(
        "POST", "/v1/orch/nodes", {"name": "edge1", "endpoint": "tcp://10.0.0.6:2375"}
    )
    assert status == 409 and _is_error(body)
    assert [n["name"] for n in (await api.call("GET", "/v1/orch/nodes"))[1]] == ["edge1"]
    assert (await api.call("DELETE", "/v1/orch/nodes/edge1"))[0] == 204
    status, body = await api.call("DELETE", "/v1/orch/nodes/edge1")
    assert status == 404 and _is_error(body)


async def test_node_with_tls_files_is_checked_when_added(api: Api, tmp_path: Path) -> None:
    status, body = await api.call(
        "POST",
        "/v1/orch/nodes",
        {"name": "edge1", "endpoint": "tcp://10.0.0.5:2376", "tls_ca": str(tmp_path / "no.pem")},
    )
    assert status == 400 and "TLS file not found" in body["message"]
    (tmp_path / "junk.pem").write_text("not a certificate")
    status, body = await api.call(
        "POST",
        "/v1/orch/nodes",
        {"name": "edge1", "endpoint": "tcp://10.0.0.5:2376", "tls_ca": str(tmp_path / "junk.pem")},
    )
    assert status == 400 and "unusable TLS files" in body["message"]
    assert (await api.call("GET", "/v1/orch/nodes"))[1] == []


@pytest.mark.parametrize(
    "body",
    [
        {"name": "n", "endpoint": "http://10.0.0.5:2375"},
        {"name": "n", "endpoint": "tcp://10.0.0.5"},
        {"name": "n", "endpoint": "unix://docker.sock"},
        {"name": "n", "endpoint": "unix:///s", "tls_ca": "/ca.pem"},
        {"name": "n", "endpoint": "tcp://h:1", "tls_cert": "/c.pem"},
        {"name": "-n", "endpoint": "tcp://h:1"},
        {"name": "n"},
        {"name": "n", "endpoint": 5},
        {"name": "n", "endpoint": "tcp://h:1", "extra": 1},
    ],
)
async def test_node_bad_input(api: Api, body: dict[str, Any]) -> None:
    status, answer = await api.call("POST", "/v1/orch/nodes", body)
    assert 400 <= status < 500 and _is_error(answer)
    assert (await api.call("GET", "/v1/orch/nodes"))[1] == []


# ---- profiles -----------------------------------------------------------------------


async def test_profile_add_list_remove_masks_the_key(api: Api) -> None:
    status, p = await api.call("POST", "/v1/orch/profiles", profile_body(env={"A": "1"}))
    assert status == 201
    assert p["pairing_key"] == KEY[:10] + "…(masked)"
    assert p["labels"] == {"app": "shop", "role": "web"}
    resp = await api.client.get("/v1/orch/profiles", headers=api.auth)
    text = await resp.text()
    assert KEY not in text
    [listed] = await resp.json()
    assert listed == p
    status, body = await api.call("POST", "/v1/orch/profiles", profile_body())
    assert status == 409 and _is_error(body)
    assert (await api.call("DELETE", "/v1/orch/profiles/web"))[0] == 204
    assert (await api.call("GET", "/v1/orch/profiles"))[1] == []
    status, body = await api.call("DELETE", "/v1/orch/profiles/web")
    assert status == 404 and _is_error(body)


async def test_profile_uses_configured_dimensions(make_api: ApiFactory) -> None:
    api = await make_api(register_local_node=False, dimensions=["tier", "zone"])
    body = profile_body(labels={"tier": "front"})
    assert (await api.call("POST", "/v1/orch/profiles", body))[0] == 201
    status, answer = await api.call(
        "POST", "/v1/orch/profiles", profile_body("x", labels={"role": "web"})
    )
    assert status == 400 and "unknown label dimension 'role'" in answer["message"]


BAD_PROFILES: list[tuple[str, bytes | dict[str, Any], int]] = [
    ("malformed json", b'{"name": "web",', 400),
    ("not json", b"hello", 400),
    ("empty body", b"", 400),
    ("a list", b"[]", 400),
    ("unknown field", profile_body(colour="red"), 400),
    ("wrong type", profile_body(command="sleep 1"), 400),
    ("wrong label type", profile_body(labels={"role": 1}), 400),
    ("missing key", {"name": "web", "image": "segd-busybox:latest"}, 400),
    ("invalid dimension", profile_body(labels={"colour": "red"}), 400),
    ("invalid value", profile_body(labels={"role": "we b"}), 400),
    ("bad name", profile_body("we/b"), 400),
    ("bad image", profile_body(image="a b"), 400),
    ("bad key", profile_body(pairing_key="two words"), 400),
    ("host network", profile_body(networks=["host"]), 400),
    ("bad env", profile_body(env={"A-B": "1"}), 400),
    ("oversize", profile_body(description="x" * 70000), 413),
]


@pytest.mark.parametrize(
    ("case", "body", "status"), BAD_PROFILES, ids=[c for c, _, _ in BAD_PROFILES]
)
async def test_profile_bad_input_writes_nothing(
    api: Api, case: str, body: bytes | dict[str, Any], status: int
) -> None:
    if isinstance(body, bytes):
        got, answer = await api.raw("POST", "/v1/orch/profiles", body)
    else:
        got, answer = await api.call("POST", "/v1/orch/profiles", body)
    assert got == status, answer
    assert _is_error(answer)
    assert KEY not in answer["message"]
    assert (await api.call("GET", "/v1/orch/profiles"))[1] == []


async def test_oversize_body_without_content_length(api: Api) -> None:
    async def chunks() -> Any:
        for _ in range(100):
            yield b"x" * 1024

    resp = await api.client.post("/v1/orch/profiles", data=chunks(), headers=api.auth)
    assert resp.status == 413
    assert _is_error(await resp.json())


# ---- run, ps, rm, change on the fake engine -----------------------------------------


async def test_run_starts_containers_with_key_and_labels(fake_api: Api, engine: FakeEngine) -> None:
    status, started = await fake_api.call("POST", "/v1/orch/run", {"profile": "web", "count": 2})
    assert status == 201
    assert len(started) == 2 and len(engine.running()) == 2
    for c in started:
        assert c["state"] == "running" and c["node"] == "fake" and c["profile"] == "web"
        assert c["labels"] == {"app": "shop", "role": "web"}
        assert c["pairing_key"] == KEY[:10] + "…(masked)"
        real = engine.containers[c["id"]]
        assert real.labels["segd.pairing-key"] == KEY
        assert real.labels["segd.label.role"] == "web"
        assert real.labels["segd.label.app"] == "shop"
        assert real.labels["segd.orch.profile"] == "web"
        assert real.labels["segd.orch.managed"] == "1"
        assert real.config["Cmd"] == ["sh", "-c", "exec sleep 100000"]
    status, listed = await fake_api.call("GET", "/v1/orch/containers")
    assert status == 200
    assert sorted(c["id"] for c in listed) == sorted(c["id"] for c in started)
    assert all(c["status"] == "Up 1 second" for c in listed)


async def test_run_uses_the_only_node_by_default(fake_api: Api, engine: FakeEngine) -> None:
    status, started = await fake_api.call("POST", "/v1/orch/run", {"profile": "web"})
    assert status == 201 and started[0]["node"] == "fake"
    await fake_api.call("POST", "/v1/orch/nodes", {"name": "other", "endpoint": "tcp://h:1"})
    status, body = await fake_api.call("POST", "/v1/orch/run", {"profile": "web"})
    assert status == 400 and "several nodes" in body["message"]


async def test_run_attaches_every_network(fake_api: Api, engine: FakeEngine) -> None:
    engine.network_names |= {"front", "back"}
    body = profile_body("multi", networks=["front", "back"])
    assert (await fake_api.call("POST", "/v1/orch/profiles", body))[0] == 201
    status, [c] = await fake_api.call("POST", "/v1/orch/run", {"profile": "multi"})
    assert status == 201
    assert engine.containers[c["id"]].networks == ["front", "back"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"profile": "nope"}, 404, "not_found"),
        ({"profile": "web", "node": "nope"}, 404, "not_found"),
        ({"profile": "web", "count": 0}, 400, "invalid_input"),
        ({"profile": "web", "count": 51}, 400, "invalid_input"),
        ({"profile": "web", "count": "2"}, 400, "invalid_input"),
        ({"profile": "web", "nodes": "fake"}, 400, "invalid_input"),
        ({}, 400, "invalid_input"),
    ],
)
async def test_run_bad_input_starts_nothing(
    fake_api: Api, engine: FakeEngine, body: dict[str, Any], status: int, code: str
) -> None:
    got, answer = await fake_api.call("POST", "/v1/orch/run", body)
    assert (got, answer["error"]) == (status, code)
    assert _is_error(answer)
    assert engine.containers == {}
    assert (await fake_api.call("GET", "/v1/orch/containers"))[1] == []


async def test_run_bad_image_leaves_nothing(fake_api: Api, engine: FakeEngine) -> None:
    await fake_api.call("POST", "/v1/orch/profiles", profile_body("ghost", image="ghost:1"))
    status, body = await fake_api.call("POST", "/v1/orch/run", {"profile": "ghost"})
    assert status == 422 and body["error"] == "image_not_found"
    assert "ghost:1" in body["message"] and "'fake'" in body["message"]
    assert engine.containers == {}
    assert (await fake_api.call("GET", "/v1/orch/containers"))[1] == []


async def test_run_bad_network_leaves_nothing(fake_api: Api, engine: FakeEngine) -> None:
    engine.network_names.add("front")
    for name, nets in (("n1", ["nowhere"]), ("n2", ["front", "nowhere"])):
        await fake_api.call("POST", "/v1/orch/profiles", profile_body(name, networks=nets))
        status, body = await fake_api.call("POST", "/v1/orch/run", {"profile": name})
        assert status == 422 and body["error"] == "network_not_found", body
        assert engine.containers == {}


async def test_failed_start_removes_the_created_container(
    fake_api: Api, engine: FakeEngine
) -> None:
    engine.fail_start = 1
    status, body = await fake_api.call("POST", "/v1/orch/run", {"profile": "web"})
    assert status == 502 and body["error"] == "docker_error"
    assert "OCI runtime" in body["message"]
    assert engine.requests and engine.containers == {}


async def test_run_is_all_or_nothing(fake_api: Api, engine: FakeEngine) -> None:
    engine.fail_start = 3
    status, body = await fake_api.call("POST", "/v1/orch/run", {"profile": "web", "count": 4})
    assert status == 502 and _is_error(body)
    assert engine.starts == 3 and engine.containers == {}
    assert (await fake_api.call("GET", "/v1/orch/containers"))[1] == []


async def test_create_without_an_answer_is_cleaned_up_by_name(
    make_api: ApiFactory, engine: FakeEngine, data_dir: Path
) -> None:
    api = await make_api(register_local_node=False)
    # The API object's orchestrator uses 30s Docker timeouts; use a short one here.
    orch = await _reopen(api, docker_timeout=0.5)
    try:
        await orch.add_node(_node("fake", "unix://" + engine.socket))
        await orch.add_profile(_profile_in(profile_body()))
        engine.create_delay = 5.0
        with pytest.raises(Exception) as e:
            await orch.run(_run_in({"profile": "web"}))
        assert getattr(e.value, "code", "") == "node_unreachable"
        assert "did not answer" in str(e.value)
        assert engine.containers == {}
    finally:
        await orch.close()


async def test_unreachable_node_gives_a_clear_error(fake_api: Api, engine: FakeEngine) -> None:
    await fake_api.call("POST", "/v1/orch/nodes", {"name": "down", "endpoint": "tcp://127.0.0.1:1"})
    status, body = await fake_api.call("POST", "/v1/orch/run", {"profile": "web", "node": "down"})
    assert status == 503 and body["error"] == "node_unreachable"
    assert body["message"] == (
        "node 'down' is unreachable at tcp://127.0.0.1:1: connection refused"
    )
    status, body = await fake_api.call(
        "POST", "/v1/orch/nodes", {"name": "gone", "endpoint": "unix:///nonexistent/docker.sock"}
    )
    status, body = await fake_api.call("POST", "/v1/orch/run", {"profile": "web", "node": "gone"})
    assert status == 503 and "no such file or directory" in body["message"]
    assert engine.containers == {}


async def test_ps_shows_missing_and_unknown(fake_api: Api, engine: FakeEngine) -> None:
    _, [a, b] = await fake_api.call("POST", "/v1/orch/run", {"profile": "web", "count": 2})
    del engine.containers[a["id"]]  # removed behind the orchestrator's back
    listed = {c["id"]: c for c in (await fake_api.call("GET", "/v1/orch/containers"))[1]}
    assert listed[a["id"]]["state"] == "missing"
    assert listed[b["id"]]["state"] == "running"
    await engine.stop()  # the node goes down
    listed = {c["id"]: c for c in (await fake_api.call("GET", "/v1/orch/containers"))[1]}
    assert {c["state"] for c in listed.values()} == {"unknown"}
    assert listed[b["id"]]["labels"] == {"app": "shop", "role": "web"}
    assert KEY not in str(listed)


async def test_ps_by_node(fake_api: Api, engine: FakeEngine) -> None:
    await fake_api.call("POST", "/v1/orch/run", {"profile": "web"})
    assert len((await fake_api.call("GET", "/v1/orch/containers?node=fake"))[1]) == 1
    status, body = await fake_api.call("GET", "/v1/orch/containers?node=nope")
    assert status == 404 and _is_error(body)
    status, body = await fake_api.call("GET", "/v1/orch/containers?nod=fake")
    assert status == 400 and _is_error(body)


@pytest.mark.parametrize("how", ["id", "prefix", "name"])
async def test_rm(fake_api: Api, engine: FakeEngine, how: str) -> None:
    _, [c] = await fake_api.call("POST", "/v1/orch/run", {"profile": "web"})
    ref = {"id": c["id"], "prefix": c["id"][:12], "name": c["name"]}[how]
    status, body = await fake_api.call("DELETE", f"/v1/orch/containers/{ref}")
    assert status == 200
    assert body == {"id": c["id"], "name": c["name"], "node": "fake", "was_gone": False}
    assert engine.containers == {}
    assert (await fake_api.call("GET", "/v1/orch/containers"))[1] == []
    status, body = await fake_api.call("DELETE", f"/v1/orch/containers/{ref}")
    assert status == 404 and _is_error(body)


async def test_rm_of_a_container_already_gone(fake_api: Api, engine: FakeEngine) -> None:
    _, [c] = await fake_api.call("POST", "/v1/orch/run", {"profile": "web"})
    engine.containers.clear()
    status, body = await fake_api.call("DELETE", f"/v1/orch/containers/{c['id']}")
    assert status == 200 and body["was_gone"] is True
    assert (await fake_api.call("GET", "/v1/orch/containers"))[1] == []


async def test_rm_refuses_ambiguous_prefixes_and_bad_refs(
    fake_api: Api, engine: FakeEngine
) -> None:
    engine.id_prefix = "abcd"
    await fake_api.call("POST", "/v1/orch/run", {"profile": "web", "count": 2})
    status, body = await fake_api.call("DELETE", "/v1/orch/containers/abcd")
    assert status == 409 and "ambiguous" in body["message"]
    status, body = await fake_api.call("DELETE", "/v1/orch/containers/abc")
    assert status == 404 and _is_error(body)
    status, body = await fake_api.call("DELETE", "/v1/orch/containers/%2Eweb")
    assert status == 400 and _is_error(body)
    assert len(engine.containers) == 2


async def test_rm_on_a_down_node_keeps_the_record(fake_api: Api, engine: FakeEngine) -> None:
    _, [c] = await fake_api.call("POST", "/v1/orch/run", {"profile": "web"})
    await engine.stop()
    status, body = await fake_api.call("DELETE", f"/v1/orch/containers/{c['id']}")
    assert status == 503 and body["error"] == "node_unreachable"
    assert len((await fake_api.call("GET", "/v1/orch/containers"))[1]) == 1


async def test_change_replaces_the_container(fake_api: Api, engine: FakeEngine) -> None:
    body = profile_body("api", pairing_key=KEY2, labels={"role": "api", "app": "shop"})
    await fake_api.call("POST", "/v1/orch/profiles", body)
    _, [old] = await fake_api.call("POST", "/v1/orch/run", {"profile": "web"})
    status, changed = await fake_api.call(
        "POST", f"/v1/orch/containers/{old['name']}/change", {"profile": "api"}
    )
    assert status == 200, changed
    new = changed["new"]
    assert changed["old"] == old["id"] and new["id"] != old["id"]
    assert new["profile"] == "api" and new["labels"] == {"app": "shop", "role": "api"}
    assert set(engine.containers) == {new["id"]}
    assert engine.containers[new["id"]].labels["segd.pairing-key"] == KEY2
    listed = (await fake_api.call("GET", "/v1/orch/containers"))[1]
    assert [c["id"] for c in listed] == [new["id"]]


async def test_change_that_cannot_start_leaves_the_old_one(
    fake_api: Api, engine: FakeEngine
) -> None:
    await fake_api.call("POST", "/v1/orch/profiles", profile_body("ghost", image="ghost:1"))
    _, [old] = await fake_api.call("POST", "/v1/orch/run", {"profile": "web"})
    status, body = await fake_api.call(
        "POST", f"/v1/orch/containers/{old['id']}/change", {"profile": "ghost"}
    )
    assert status == 422 and body["error"] == "image_not_found"
    assert set(engine.containers) == {old["id"]}
    assert engine.containers[old["id"]].state == "running"
    engine.fail_start = engine.starts + 1
    status, body = await fake_api.call(
        "POST", f"/v1/orch/containers/{old['id']}/change", {"profile": "web"}
    )
    assert status == 502
    assert set(engine.containers) == {old["id"]}
    listed = (await fake_api.call("GET", "/v1/orch/containers"))[1]
    assert [c["id"] for c in listed] == [old["id"]]


async def test_change_whose_old_container_cannot_go(fake_api: Api, engine: FakeEngine) -> None:
    _, [old] = await fake_api.call("POST", "/v1/orch/run", {"profile": "web"})
    engine.fail_delete = True
    status, body = await fake_api.call(
        "POST", f"/v1/orch/containers/{old['id']}/change", {"profile": "web"}
    )
    assert status == 502 and body["error"] == "old_not_removed"
    assert "is running but the old one" in body["message"]
    assert len(engine.running()) == 2
    listed = (await fake_api.call("GET", "/v1/orch/containers"))[1]
    assert len(listed) == 2  # both are recorded: the admin can rm the old one


@pytest.mark.parametrize(
    ("ref", "body", "status"),
    [
        ("nope", {"profile": "web"}, 404),
        ("{id}", {"profile": "nope"}, 404),
        ("{id}", {"profile": 1}, 400),
        ("{id}", {"profile": "web", "node": "x"}, 400),
        ("{id}", None, 400),
    ],
)
async def test_change_bad_input(
    fake_api: Api, engine: FakeEngine, ref: str, body: Any, status: int
) -> None:
    _, [old] = await fake_api.call("POST", "/v1/orch/run", {"profile": "web"})
    path = f"/v1/orch/containers/{ref.format(id=old['id'])}/change"
    got, answer = await fake_api.call("POST", path, body)
    assert got == status and _is_error(answer)
    assert set(engine.containers) == {old["id"]}


async def test_profile_and_node_in_use_cannot_be_removed(fake_api: Api, engine: FakeEngine) -> None:
    _, [c] = await fake_api.call("POST", "/v1/orch/run", {"profile": "web"})
    status, body = await fake_api.call("DELETE", "/v1/orch/profiles/web")
    assert status == 409 and "used by 1 container" in body["message"]
    status, body = await fake_api.call("DELETE", "/v1/orch/nodes/fake")
    assert status == 409 and "rm them first" in body["message"]
    await fake_api.call("DELETE", f"/v1/orch/containers/{c['id']}")
    assert (await fake_api.call("DELETE", "/v1/orch/profiles/web"))[0] == 204
    assert (await fake_api.call("DELETE", "/v1/orch/nodes/fake"))[0] == 204


async def test_the_key_never_reaches_the_logs(api: Api, engine: FakeEngine) -> None:
    with structlog.testing.capture_logs() as logs:
        await api.call(
            "POST", "/v1/orch/nodes", {"name": "fake", "endpoint": "unix://" + engine.socket}
        )
        await api.call("POST", "/v1/orch/nodes", {"name": "down", "endpoint": "tcp://127.0.0.1:1"})
        await api.call("POST", "/v1/orch/profiles", profile_body())
        await api.call("POST", "/v1/orch/profiles", profile_body("ghost", image="ghost:1"))
        _, [c] = await api.call("POST", "/v1/orch/run", {"profile": "web", "node": "fake"})
        await api.call("POST", "/v1/orch/run", {"profile": "ghost", "node": "fake"})
        await api.call("POST", "/v1/orch/run", {"profile": "web", "node": "down"})
        await api.call("POST", f"/v1/orch/containers/{c['id']}/change", {"profile": "web"})
        await api.call("POST", "/v1/orch/profiles", profile_body(pairing_key="bad key " + KEY))
        await api.call("GET", "/v1/orch/containers")
        await api.call("GET", "/v1/orch/profiles")
    events = {e["event"] for e in logs}
    assert {"profile.added", "container.started", "container.changed"} <= events
    assert KEY not in repr(logs)


# ---- mounting on another application ------------------------------------------------


async def test_routes_mount_on_another_app(aiohttp_client: Any, data_dir: Path) -> None:
    cfg = OrchestratorConfig(data_dir=str(data_dir), register_local_node=False)
    orch = await Orchestrator.open(cfg)
    try:

        async def other(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        host = web.Application()
        host.router.add_get("/v1/other", other)
        add_routes(host, orch, accept_token=lambda t: t == "host-admin-token")
        client: TestClient[Any, Any] = await aiohttp_client(host)
        for token in ("host-admin-token", orch.token_file.read_text().strip()):
            resp = await client.get("/v1/orch/nodes", headers={"Authorization": f"Bearer {token}"})
            assert resp.status == 200 and await resp.json() == []
        resp = await client.get("/v1/orch/nodes", headers={"Authorization": "Bearer nope"})
        assert resp.status == 401 and _is_error(await resp.json())
        assert (await client.get("/v1/other")).status == 200
    finally:
        await orch.close()


# ---- a profile whose key expired ------------------------------------------------------


async def test_run_with_an_expired_key_started_containers_that_stayed_isolated(
    fake_api: Api, engine: FakeEngine
) -> None:
    """The key's claims say when it expires: a run (or a change to the profile)
    after that starts nothing and says what to do."""
    exp = soon()
    body = profile_body("soon", pairing_key=pairing_key(exp))
    assert (await fake_api.call("POST", "/v1/orch/profiles", body))[0] == 201
    status, [c] = await fake_api.call("POST", "/v1/orch/run", {"profile": "web"})
    assert status == 201
    await asyncio.to_thread(wait_past, exp)
    for method, path, req in (
        ("POST", "/v1/orch/run", {"profile": "soon", "count": 3}),
        ("POST", f"/v1/orch/containers/{c['id']}/change", {"profile": "soon"}),
    ):
        status, answer = await fake_api.call(method, path, req)
        assert (status, answer["error"]) == (409, "key_expired"), answer
        assert "set-key soon" in answer["message"] and "\n" not in answer["message"]
    assert [x.id for x in engine.running()] == [c["id"]]


async def test_profile_key_can_be_replaced(fake_api: Api, engine: FakeEngine) -> None:
    expired = pairing_key(time.time() - 1)
    status, answer = await fake_api.call(
        "POST", "/v1/orch/profiles", profile_body("x", pairing_key=expired)
    )
    assert (status, answer["error"]) == (409, "key_expired")
    status, answer = await fake_api.call(
        "PUT", "/v1/orch/profiles/web/key", {"pairing_key": expired}
    )
    assert (status, answer["error"]) == (409, "key_expired")
    fresh = pairing_key(time.time() + 3600)
    status, p = await fake_api.call("PUT", "/v1/orch/profiles/web/key", {"pairing_key": fresh})
    assert status == 200 and p["pairing_key"] == fresh[:10] + "…(masked)"
    status, [c] = await fake_api.call("POST", "/v1/orch/run", {"profile": "web"})
    assert engine.containers[c["id"]].labels["segd.pairing-key"] == fresh
    for path, req, code in (
        ("/v1/orch/profiles/nope/key", {"pairing_key": fresh}, 404),
        ("/v1/orch/profiles/web/key", {"pairing_key": "two words"}, 400),
        ("/v1/orch/profiles/web/key", {"pairing_key": fresh, "x": 1}, 400),
        ("/v1/orch/profiles/web/key", {}, 400),
    ):
        status, answer = await fake_api.call("PUT", path, req)
        assert status == code and _is_error(answer), answer


# ---- helpers ------------------------------------------------------------------------


async def _reopen(api: Api, **kw: Any) -> Orchestrator:
    """Stop the API's own orchestrator and open its data dir again with `kw`."""
    await api.client.close()
    return await Orchestrator.open(api.cfg, **kw)


def _node(name: str, endpoint: str) -> wire.NodeIn:
    return wire.NodeIn(name=name, endpoint=endpoint)


def _profile_in(body: dict[str, Any]) -> wire.ProfileIn:
    return msgspec.convert(body, wire.ProfileIn)


def _run_in(body: dict[str, Any]) -> wire.RunIn:
    return msgspec.convert(body, wire.RunIn)
