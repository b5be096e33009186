"""The agent in process, without root: the real `Agent` against the fake Docker
engine (on a unix socket, through aiodocker), a fake host whose namespaces hold
nft rulesets built from the plans' real text, and the real server (in the same
event loop, on a loopback port).

    async def test_x(world: World) -> None:
        db = await world.run("db", key=await world.key({"role": "db"}))
        await world.until(lambda: world.enforced(db))
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from segd.agent.agent import Agent
from segd.agent.events import ContainerInfo
from segd.config import ADMIN_TOKEN_FILE, AgentConfig, ServerConfig
from segd.server.app import ServerRunner
from tests.agent_inproc.fakes import FakeHost
from tests.faults.load import AdminClient
from tests.orchestrator.fake_engine import FakeContainer, FakeEngine

KEY = "segd.pairing-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class World:
    """One host (engine, namespaces, agent) and its server."""

    def __init__(self, root: Path, sock_dir: Path) -> None:
        self.root = root
        self.engine = FakeEngine()
        self.kernel = FakeHost(self.engine)
        self.socket = str(sock_dir / "docker.sock")
        port = _free_port()
        self.server_cfg = ServerConfig(
            data_dir=str(root / "server"), listen=f"127.0.0.1:{port}", longpoll_timeout_s=2.0
        )
        self.url = f"http://127.0.0.1:{port}"
        self.server: ServerRunner | None = None
        self.session: aiohttp.ClientSession | None = None
        self.admin: AdminClient | None = None
        self.agent: Agent | None = None
        self._task: asyncio.Task[None] | None = None
        self.agent_cfg = AgentConfig(
            server=self.url,
            state_dir=str(root / "agent"),
            docker_url=f"unix://{self.socket}",
            reconcile_interval_s=3600,  # tests ask for a reconcile when they want one
            backoff_max_s=0.2,
        )

    # ---- processes ----------------------------------------------------------------

    async def start_server(self) -> None:
        self.server = ServerRunner(self.server_cfg, shutdown_timeout=0.2)
        await self.server.start()
        if self.session is None:
            self.session = aiohttp.ClientSession()
        token = (Path(self.server_cfg.data_dir) / ADMIN_TOKEN_FILE).read_text().strip()
        self.admin = AdminClient(self.url, token, self.session)

    async def stop_server(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def start_agent(self, **cfg: Any) -> Agent:
        code = ""
        if not (Path(self.agent_cfg.state_dir) / "identity.json").exists():
            code = (await self.api("POST", "/v1/activation-codes", {}))["code"]
        agent_cfg = AgentConfig(**{**_fields(self.agent_cfg), **cfg})
        agent = Agent(
            agent_cfg,
            activation_code=code,
            firewall=self.kernel,
            host_lock=lambda: lambda: None,
            ns_of=self.kernel.ns_of,
        )
        self.agent = agent
        self._task = asyncio.create_task(agent.run())
        ready = asyncio.create_task(agent.ready.wait())
        await asyncio.wait({ready, self._task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()
        assert agent.ready.is_set(), "the agent's first sync"
        return agent

    async def stop_agent(self) -> None:
        """What SIGKILL leaves: kernel state stays, the state dir too."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def close(self) -> None:
        await self.stop_agent()
        await self.stop_server()
        await self.engine.stop()
        if self.session is not None:
            await self.session.close()

    # ---- the server ------------------------------------------------------------------

    async def api(self, method: str, path: str, body: Any = None) -> Any:
        assert self.admin is not None
        return await self.admin.call(method, path, body)

    async def rule(self, provider: dict[str, str], consumer: dict[str, str], svc: str) -> str:
        body = {"providers": [provider], "consumers": [consumer], "services": [svc]}
        return str((await self.api("POST", "/v1/rules", body))["id"])

    async def key(self, labels: dict[str, str], *, max_uses: int = 10) -> str:
        name = "p" + str(len(await self.api("GET", "/v1/profiles")))
        body = {"name": name, "labels": labels, "locked": sorted(labels), "max_uses": max_uses}
        await self.api("POST", "/v1/profiles", body)
        return str((await self.api("POST", "/v1/keys", {"profile": name}))["token"])

    async def workloads(self) -> set[str]:
        return {w["container_id"] for w in await self.api("GET", "/v1/workloads")}

    # ---- containers -------------------------------------------------------------------

    def run(self, name: str, *, key: str = "", mode: str = "bridge") -> FakeContainer:
        c = self.engine.add(name, {KEY: key} if key else {}, mode)
        self.engine.launch(c)
        return c

    def rm(self, c: FakeContainer) -> None:
        self.engine.halt(c, destroy=True)

    def restart(self, c: FakeContainer) -> None:
        self.engine.halt(c)
        self.engine.launch(c)

    # ---- what the agent made of it ----------------------------------------------------

    def kind(self, c: FakeContainer) -> str | None:
        """What the agent has in place for a running container (None: nothing yet)."""
        assert self.agent is not None
        rec = self.agent.host.enforced.get(c.id)
        if rec is None or (rec.ns.path != f"/proc/{c.pid}/ns/net"):
            return None
        return rec.kind

    def enforced(self, c: FakeContainer) -> bool:
        """Its workload table is in place and the gate admits it."""
        t = self.kernel.table(c) or ""
        gate = self.kernel.gate() or ""
        return self.kind(c) == "workload" and "chain input" in t and f". {c.ip}" in gate

    def info(self, c: FakeContainer) -> ContainerInfo | None:
        assert self.agent is not None
        return self.agent.host.containers.get(c.id)

    async def until(self, pred: Callable[[], object], what: str = "", within: float = 5.0) -> None:
        """Wait (on the loop) until `pred()` holds; `pred` may be a coroutine function."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            got = pred()
            if inspect.isawaitable(got):
                got = await got
            if got:
                return
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what or pred}")
            await asyncio.sleep(0.005)

    async def paired(self, *cs: FakeContainer) -> None:
        """Wait until exactly these containers are the server's workloads and enforced."""
        want = {c.id for c in cs}

        async def done() -> bool:
            return await self.workloads() == want and all(self.enforced(c) for c in cs)

        await self.until(done, f"workloads {sorted(c.name for c in cs)}", within=10)

    async def reconcile(self) -> None:
        """One full reconcile and drift check, as the periodic one does."""
        assert self.agent is not None
        await self.agent._resync()
        await self.agent.enforcer.check_drift()


def _fields(cfg: AgentConfig) -> dict[str, Any]:
    return {f: getattr(cfg, f) for f in cfg.__struct_fields__}


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    sock_dir = Path(tempfile.mkdtemp(prefix="segd-ip-"))  # a unix socket path stays short
    w = World(tmp_path, sock_dir)
    try:
        await w.engine.start(w.socket)
        await w.start_server()
        yield w
    finally:
        await w.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
