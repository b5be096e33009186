"""In-process server fixtures: a temp data dir, a settable clock, an admin client
and registered agents that sign their requests.

    async def test_x(api: Admin, make_agent: MakeAgent) -> None:
        await api.ok("POST", "/v1/rules", {...}, status=201)
        agent = await make_agent("host-a")
        status, body = await agent.pair("c1", token, ["10.0.0.2"])
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nacl.signing
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, get_port_socket

from segd import crypto, wire
from segd.config import ADMIN_TOKEN_FILE, ConnectionLimits, MeshConfig, ServerConfig
from segd.http.connections import gate
from segd.http.listener import ListenerRunner
from segd.server.app import ServerRunner, build_app, service_of
from segd.server.service import Service

# The test servers' mesh pool: 10.0.0.0/8 addresses outside it are host-local.
MESH_POOL = "10.200.0.0/16"

AiohttpClient = Callable[[web.Application | TestServer], Awaitable[TestClient[Any, Any]]]


class Clock:
    """Real time plus an offset the test can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Admin:
    """The admin API through the aiohttp test client, with the bearer token."""

    def __init__(self, client: TestClient[Any, Any], token: str) -> None:
        self.client = client
        self.token = token

    @property
    def app(self) -> web.Application:
        return self.client.app  # type: ignore[no-any-return]

    @property
    def svc(self) -> Service:
        return service_of(self.app)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        data: bytes | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        hdrs = {"Authorization": f"Bearer {self.token if token is None else token}"}
        hdrs.update(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
        async with self.client.request(method, path, data=data, headers=hdrs) as r:
            raw = await r.read()
            return r.status, (json.loads(raw) if raw else None)

    async def ok(self, method: str, path: str, body: Any = None, *, status: int = 200) -> Any:
        got, out = await self.call(method, path, body)
        assert got == status, (got, out)
        return out

    async def setup_policy(
        self,
        *,
        profile: str = "db",
        labels: dict[str, str] | None = None,
        locked: tuple[str, ...] = ("role",),
        max_uses: int = 10,
        on_mismatch: str = "deny",
    ) -> str:
        """A profile and one key for it; returns the key token."""
        await self.ok(
            "POST",
            "/v1/profiles",
            {
                "name": profile,
                "labels": labels or {"role": "db", "app": "shop"},
                "locked": list(locked),
                "max_uses": max_uses,
                "on_mismatch": on_mismatch,
            },
            status=201,
        )
        issued = await self.ok("POST", "/v1/keys", {"profile": profile}, status=201)
        return str(issued["token"])

    async def snapshot(self) -> dict[str, Any]:
        """Everything an admin can list, to prove a refused request wrote nothing
        (a host's `last_seen` is left out: any agent request may move it)."""
        out: dict[str, Any] = {}
        for name in ("rules", "profiles", "keys", "workloads", "hosts"):
            out[name] = await self.ok("GET", f"/v1/{name}")
        for h in out["hosts"]:
            h.pop("last_seen")
        return out


class Agent:
    """A registered agent: its host id, its key, and signed requests."""

    def __init__(
        self,
        client: TestClient[Any, Any],
        host_id: str,
        key: nacl.signing.SigningKey,
        clock: Clock,
        server_keys: dict[str, str],
    ) -> None:
        self.client = client
        self.host_id = host_id
        self.key = key
        self.clock = clock
        self.server_keys = server_keys
        self.subnet = ""  # once it joined the mesh

    async def join_mesh(self, endpoint: str = "192.0.2.1:51820", key: str = "") -> str:
        """Join the mesh (with a fresh WireGuard key unless given); returns the subnet."""
        key = key or base64.b64encode(os.urandom(32)).decode()
        body = {"public_key": key, "endpoint": endpoint}
        status, res = await self.request("PUT", "/v1/agent/mesh", body)
        assert status == 200, res
        self.subnet = str(res["subnet"])
        return self.subnet

    def ip(self, n: int) -> str:
        """The `n`th address of the host's mesh subnet."""
        assert self.subnet, "join the mesh first"
        return str(ipaddress.ip_network(self.subnet)[n])

    def sign(
        self, method: str, path_qs: str, body: bytes = b"", *, at: float | None = None
    ) -> dict[str, str]:
        now = self.clock() if at is None else at
        return crypto.sign_request(self.key, self.host_id, method, path_qs, body, now)

    async def raw(self, method: str, path_qs: str, data: bytes) -> tuple[int, Any]:
        """Send exact body bytes, correctly signed (to test what the server makes of them)."""
        hdrs = self.sign(method, path_qs, data)
        async with self.client.request(method, path_qs, data=data, headers=hdrs) as r:
            raw = await r.read()
            return r.status, (json.loads(raw) if raw else None)

    async def request(
        self,
        method: str,
        path_qs: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        data = b"" if body is None else json.dumps(body).encode()
        hdrs = headers if headers is not None else self.sign(method, path_qs, data)
        async with self.client.request(method, path_qs, data=data, headers=hdrs) as r:
            raw = await r.read()
            return r.status, (json.loads(raw) if raw else None)

    async def pair(
        self,
        container_id: str,
        token: str,
        ips: list[str],
        labels: dict[str, str] | None = None,
        name: str = "",
    ) -> tuple[int, Any]:
        body = {
            "container_id": container_id,
            "pairing_key": token,
            "ips": ips,
            "name": name,
            "requested_labels": labels or {},
        }
        return await self.request("POST", "/v1/agent/pair", body)

    async def unpair(self, container_id: str) -> tuple[int, Any]:
        return await self.request("POST", "/v1/agent/unpair", {"container_id": container_id})

    async def instructions(self, since: int = 0, wait: float = 0) -> tuple[int, Any]:
        return await self.request("GET", f"/v1/agent/instructions?since={since}&wait={wait}")

    async def paired(self, res: Any) -> wire.Instructions:
        """The host's instructions at a pairing answer's version, as the long-poll
        brings them (the answer carries the version, not the instructions)."""
        assert "instructions" not in res, res
        status, signed = await self.instructions(since=res["version"] - 1, wait=2)
        assert status == 200, signed
        instr = self.open(signed)
        assert instr.version == res["version"]
        return instr

    def open(self, signed: Any) -> wire.Instructions:
        """Verify signed instructions with the server key and decode them."""
        s = msgspec.convert(signed, wire.SignedInstructions)
        vk = crypto.verify_key_from_b64(self.server_keys[s.key_id])
        payload = crypto.b64d(s.payload)
        assert crypto.verify(vk, payload, crypto.b64d(s.signature))
        return msgspec.json.decode(payload, type=wire.Instructions)


MakeAgent = Callable[..., Awaitable[Agent]]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server_cfg(tmp_path: Path) -> ServerConfig:
    return ServerConfig(
        data_dir=str(tmp_path / "server"),
        longpoll_timeout_s=5.0,
        request_skew_s=60.0,
        mesh=MeshConfig(pool=MESH_POOL),
    )


class ListenerTestServer(TestServer):
    """An app behind segd's own listener (segd.http.listener), as in production."""

    def __init__(self, app: web.Application, limits: ConnectionLimits) -> None:
        self.limits = limits
        super().__init__(app, socket_factory=self._gate_socket)

    async def _make_runner(self, **kwargs: Any) -> ListenerRunner:
        # As `segd.http.runner.Runner`: a handler goes on when its client goes.
        kwargs.pop("handler_cancellation", None)
        return ListenerRunner(self.app, self.limits, **kwargs)

    def _gate_socket(self, host: str, port: int, family: socket.AddressFamily) -> socket.socket:
        assert isinstance(self.runner, ListenerRunner)
        return gate(get_port_socket(host, port, family), self.runner.guard)


async def start_admin(aiohttp_client: AiohttpClient, cfg: ServerConfig, clock: Clock) -> Admin:
    """Start an app on `cfg` and return its admin client (used again after a restart)."""
    client = await aiohttp_client(ListenerTestServer(build_app(cfg, clock=clock), cfg.connections))
    token = (Path(cfg.data_dir) / ADMIN_TOKEN_FILE).read_text().strip()
    return Admin(client, token)


@pytest.fixture
async def api(aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock) -> Admin:
    return await start_admin(aiohttp_client, server_cfg, clock)


async def register_agent(api: Admin, clock: Clock, hostname: str = "host") -> Agent:
    code = await api.ok("POST", "/v1/activation-codes", {}, status=201)
    key = nacl.signing.SigningKey.generate()
    body = {
        "activation_code": code["code"],
        "public_key": crypto.b64e(bytes(key.verify_key)),
        "hostname": hostname,
    }
    async with api.client.post("/v1/agent/register", json=body) as r:
        assert r.status == 201, await r.text()
        reg = await r.json()
    return Agent(api.client, reg["host_id"], key, clock, reg["server_keys"])


@pytest.fixture
async def make_agent(api: Admin, clock: Clock) -> AsyncIterator[MakeAgent]:
    async def make(hostname: str = "host") -> Agent:
        return await register_agent(api, clock, hostname)

    yield make


# ---- a real server on a loopback port, in a background thread -----------------------


class LiveServer:
    """`segd server` on a free loopback port in its own thread and event loop."""

    def __init__(self, cfg: ServerConfig, sock: socket.socket) -> None:
        self.cfg = cfg
        self.url = ""
        self.token_file = Path(cfg.data_dir) / ADMIN_TOKEN_FILE
        self._sock = sock
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="segd-live-server", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            runner = ServerRunner(self.cfg, sock=self._sock, shutdown_timeout=2.0)
            await runner.start()
            self.url = runner.url
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await runner.stop()

        try:
            asyncio.run(main())
        except BaseException as e:
            self._error = e
            self._ready.set()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"live server did not start: {self._error!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if self._error is not None:
            raise self._error

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()


def start_live_server(data_dir: Path, **settings: Any) -> LiveServer:
    """Start a live server on a free loopback port; `settings` are ServerConfig fields."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    cfg = ServerConfig(data_dir=str(data_dir), listen=f"127.0.0.1:{port}", **settings)
    server = LiveServer(cfg, sock)
    server.start()
    return server


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    """A real server; its data dir sits where `segd ctl` looks for an allinone one
    (`<tmp>/allinone/server`), so tests can set SEGD_DATA_DIR=<tmp>/allinone."""
    server = start_live_server(
        tmp_path / "allinone" / "server", longpoll_timeout_s=2.0, mesh=MeshConfig(pool=MESH_POOL)
    )
    try:
        yield server
    finally:
        server.stop()
