"""Fixtures for the orchestrator: a temp data dir, the API in process (behind
segd's listener), a fake Docker engine on a unix socket, and the real engine
(root only)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from aiohttp.test_utils import TestClient

from segd.config import OrchestratorConfig
from segd.orchestrator.app import build_app
from segd.server import tokens
from tests.api.conftest import ListenerTestServer
from tests.hostreq import docker_missing, require
from tests.orchestrator.fake_engine import FakeEngine

IMAGE = "segd-busybox:latest"
SLEEP = ["sh", "-c", "exec sleep 100000"]
TEST_LABEL = "segd.test"
RUN_LABEL = "segd.test.run"
KEY = "segd1.eyJ2IjoxLCJraWQiOiJrXzAxMjM0NTY3ODkifQ.c2VjcmV0LXNpZ25hdHVyZS1vZi10aGUta2V5"
KEY2 = "segd1.eyJ2IjoxLCJraWQiOiJrX2ZlZWRmYWNlMDAwMCJ9.YW5vdGhlci1zZWNyZXQtc2lnbmF0dXJl"


def pairing_key(exp: float) -> str:
    """A token in the server's format expiring at `exp` (signed by a throwaway key:
    the orchestrator reads the claims, the server checks the signature)."""
    claims = tokens.Claims(
        v=tokens.VERSION, kid="k_0123456789abcdef", pid="p_0123456789ab", sk="0" * 16,
        iat=int(exp) - 3600, exp=int(exp),
    )  # fmt: skip
    return tokens.issue(nacl.signing.SigningKey.generate(), claims)


# How soon a key "about to expire" expires: room for the steps that must still
# take it (an HTTP round trip to an orchestrator thread) on a loaded machine.
SOON_S = 3.0


def soon() -> float:
    return time.time() + SOON_S


def wait_past(exp: float) -> None:
    """Until the clock has passed `exp` (a key made to expire a moment from now)."""
    while time.time() < exp:
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def profile_body(name: str = "web", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "image": IMAGE,
        "pairing_key": KEY,
        "command": SLEEP,
        "labels": {"role": "web", "app": "shop"},
    }
    body.update(over)
    return body


@dataclass
class Api:
    """The orchestrator API in process, with its admin token."""

    client: TestClient[Any, Any]
    token: str
    cfg: OrchestratorConfig

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        resp = await self.client.request(method, path, json=body, headers=self.auth, **kw)
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None)

    async def raw(self, method: str, path: str, data: bytes, **kw: Any) -> tuple[int, Any]:
        resp = await self.client.request(method, path, data=data, headers=self.auth, **kw)
        return resp.status, await resp.json()


ApiFactory = Callable[..., Awaitable[Api]]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "orch"


@pytest.fixture
def make_api(aiohttp_client: Any, data_dir: Path) -> ApiFactory:
    async def make(**cfg_over: Any) -> Api:
        cfg = OrchestratorConfig(data_dir=str(data_dir), **cfg_over)
        client = await aiohttp_client(ListenerTestServer(build_app(cfg), cfg.connections))
        token = (data_dir / "admin.token").read_text().strip()
        return Api(client, token, cfg)

    return make


@pytest.fixture
async def api(make_api: ApiFactory) -> Api:
    return await make_api(register_local_node=False)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes: keep this one short.
    d = Path(tempfile.mkdtemp(prefix="segd-o-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def engine(sock_dir: Path) -> AsyncIterator[FakeEngine]:
    e = FakeEngine()
    await e.start(str(sock_dir / "docker.sock"))
    try:
        yield e
    finally:
        await e.stop()


@pytest.fixture
async def fake_api(api: Api, engine: FakeEngine) -> Api:
    """The API with node `fake` (the fake engine) and profile `web`."""
    status, _ = await api.call(
        "POST", "/v1/orch/nodes", {"name": "fake", "endpoint": "unix://" + engine.socket}
    )
    assert status == 201
    status, _ = await api.call("POST", "/v1/orch/profiles", profile_body())
    assert status == 201
    return api


# ---- the real Docker engine ---------------------------------------------------------


def docker(*args: str, check: bool = True) -> str:
    p = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Skip without root/Docker, but fail under CI or SEGD_REQUIRE_DOCKER."""
    require(docker_missing())


@pytest.fixture
def run_id(docker_engine: None) -> Iterator[str]:
    """A label value unique to one test; its containers are removed afterwards."""
    rid = uuid.uuid4().hex[:12]
    try:
        yield rid
    finally:
        left = containers_of(rid)
        if left:
            docker("rm", "-f", *left, check=False)


def containers_of(rid: str) -> list[str]:
    """Every container (running or not) started by the test `rid`."""
    return docker("ps", "-aq", "--no-trunc", "--filter", f"label={RUN_LABEL}={rid}").split()


def labels_for(rid: str) -> dict[str, str]:
    return {TEST_LABEL: "orch", RUN_LABEL: rid}
