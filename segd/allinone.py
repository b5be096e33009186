"""`segd allinone`: server, orchestrator and agent in one process and one loop.

No config file needed. Everything lives under one data dir:

    <data-dir>/server/        store, signing key, admin.token (for `segd ctl`)
    <data-dir>/orchestrator/  container profiles and nodes (`local` registered)
    <data-dir>/agent/         agent key, identity, last signed instructions

One loopback listener serves the server API and the orchestrator's `/v1/orch/`
routes; the server's admin token is accepted by both. The agent registers
itself with an activation code minted in-process on first start.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import msgspec

from segd import log, sdnotify
from segd.agent.agent import Agent
from segd.config import DEFAULT_ALLINONE_DIR, Config
from segd.orchestrator.app import add_routes, limiter_of
from segd.orchestrator.service import Orchestrator
from segd.server.app import ServerRunner
from segd.wire import ActivationCodeIn

_log = log.get("segd.allinone")


def layout(data_dir: str) -> dict[str, Path]:
    root = Path(data_dir or DEFAULT_ALLINONE_DIR)
    return {
        "root": root,
        "server": root / "server",
        "orchestrator": root / "orchestrator",
        "agent": root / "agent",
    }


async def run_allinone(
    cfg: Config,
    *,
    data_dir: str = "",
    listen: str = "",
    stop: asyncio.Event | None = None,
) -> None:
    """Run all three parts until `stop` is set or the task is cancelled."""
    paths = layout(data_dir)
    paths["root"].mkdir(parents=True, exist_ok=True)
    paths["root"].chmod(0o700)
    server_cfg = msgspec.structs.replace(
        cfg.server, data_dir=str(paths["server"]), listen=listen or cfg.server.listen
    )
    orch_cfg = msgspec.structs.replace(cfg.orchestrator, data_dir=str(paths["orchestrator"]))
    runner = ServerRunner(server_cfg)
    orch = await Orchestrator.open(orch_cfg)

    def admin_ok(token: str) -> bool:
        return runner.service.is_admin(token)

    add_routes(
        runner.app,
        orch,
        max_body_bytes=orch_cfg.max_body_bytes,
        accept_token=admin_ok,
        limiter=limiter_of(orch_cfg),
    )
    agent_task: asyncio.Task[None] | None = None
    try:
        await runner.start()
        agent_cfg = msgspec.structs.replace(
            cfg.agent, server=runner.url, state_dir=str(paths["agent"])
        )
        code = ""
        if not (paths["agent"] / "identity.json").exists():
            code = (
                await runner.service.admin.new_activation_code(ActivationCodeIn(lifespan_s=300))
            ).code
        agent = Agent(agent_cfg, activation_code=code)
        agent_task = asyncio.create_task(agent.run(), name="segd-agent")
        ready = asyncio.create_task(agent.ready.wait())
        await asyncio.wait({ready, agent_task}, return_when=asyncio.FIRST_COMPLETED)
        if agent_task.done():
            ready.cancel()
            agent_task.result()  # raises what stopped the agent
            raise RuntimeError("the agent stopped during start-up")
        sdnotify.notify("READY=1")
        _log.info("allinone.ready", url=runner.url, data_dir=str(paths["root"]))
        waiter = asyncio.create_task((stop or asyncio.Event()).wait())
        await asyncio.wait({waiter, agent_task}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if agent_task.done():
            agent_task.result()
    finally:
        sdnotify.notify("STOPPING=1")
        if agent_task is not None and not agent_task.done():
            agent_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await agent_task
        await runner.stop()
        await orch.close()
        _log.info("allinone.stopped")
