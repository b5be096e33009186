"""Running the orchestrator: the aiohttp application and its lifecycle.

- `run_orchestrator(cfg)`: the `segd orchestrator` daemon, until cancelled.
- `OrchestratorServer(cfg)`: the same on its own listener inside an event loop
  that runs other things too (`await start()`, `await stop()`).
- `build_app(cfg)`: a standalone application (opens and closes its own
  `Orchestrator` in a cleanup context unless one is given).
- `add_routes(app, orch)`: mount `/v1/orch/...` on another application.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from segd import __version__, log, sdnotify
from segd.config import OrchestratorConfig
from segd.http.routes import Call, Route, application
from segd.http.runner import Runner
from segd.orchestrator.api import OrchestratorAPI, TokenCheck
from segd.orchestrator.service import Orchestrator
from segd.ratelimit import TokenBuckets
from segd.wire import Health

SHUTDOWN_TIMEOUT_S = 10.0  # how long in-flight requests may finish on stop
API_KEY = web.AppKey("orchestrator_api", OrchestratorAPI)

_log = log.get(__name__)


def limiter_of(cfg: OrchestratorConfig) -> TokenBuckets:
    return TokenBuckets(cfg.rate_limit_per_s, cfg.rate_limit_burst)


async def _health(c: Call[Orchestrator]) -> Health:
    return Health(status="ok", version=__version__)


HEALTH = Route("GET", "/v1/health", _health, "Liveness", auth="none", response=Health)


def add_routes(
    app: web.Application,
    orch: Orchestrator | None,
    *,
    max_body_bytes: int = 65536,
    accept_token: TokenCheck | None = None,
    limiter: TokenBuckets | None = None,
) -> OrchestratorAPI:
    """Add the `/v1/orch/` routes to `app` (before it starts); `bind` later if None."""
    api = OrchestratorAPI(
        orch, max_body_bytes=max_body_bytes, accept_token=accept_token, limiter=limiter
    )
    app.router.add_routes(api.routes())
    return api


def build_app(
    cfg: OrchestratorConfig,
    orch: Orchestrator | None = None,
    *,
    accept_token: TokenCheck | None = None,
) -> web.Application:
    """The orchestrator's own application, with `/v1/health`.

    Without `orch`, the application opens one from `cfg` on startup and closes
    it on cleanup (after in-flight requests are drained).
    """
    app = application(cfg.max_body_bytes)
    api = add_routes(
        app,
        orch,
        max_body_bytes=cfg.max_body_bytes,
        accept_token=accept_token,
        limiter=limiter_of(cfg),
    )
    app[API_KEY] = api
    app.router.add_get("/v1/health", api.public(HEALTH))
    if orch is None:

        async def owned(app: web.Application) -> AsyncIterator[None]:
            opened = await Orchestrator.open(cfg)
            api.bind(opened)
            try:
                yield
            finally:
                api.bind(None)
                await opened.close()

        app.cleanup_ctx.append(owned)
    return app


class OrchestratorServer:
    """The orchestrator API on its own listener, in the running event loop."""

    def __init__(
        self,
        cfg: OrchestratorConfig,
        orch: Orchestrator | None = None,
        *,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT_S,
    ) -> None:
        self.cfg = cfg
        self._shutdown_timeout = shutdown_timeout
        self.orch = orch
        self._owns_orch = orch is None
        self._runner: Runner | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Bound (host, port) pairs; useful with port 0."""
        return [] if self._runner is None else self._runner.addresses

    async def start(self) -> None:
        if self.orch is None:
            self.orch = await Orchestrator.open(self.cfg)
        runner = Runner(
            build_app(self.cfg, self.orch),
            listen=self.cfg.listen,
            limits=self.cfg.connections,
            tls=self.cfg.tls,
            shutdown_timeout=self._shutdown_timeout,
        )
        self._runner = runner
        try:
            await runner.start()
        except BaseException:
            await self.stop()
            raise
        _log.info(
            "orchestrator.listening",
            listen=self.cfg.listen,
            tls=runner.tls,
            data_dir=self.cfg.data_dir,
        )

    async def stop(self) -> None:
        """Stop accepting, drain in-flight requests (with a timeout), close."""
        try:
            if self._runner is not None:
                runner, self._runner = self._runner, None
                await runner.stop()
        finally:
            if self._owns_orch and self.orch is not None:
                orch, self.orch = self.orch, None
                await orch.close()


async def run_orchestrator(cfg: OrchestratorConfig) -> None:
    """Run `segd orchestrator` until cancelled (SIGTERM), then stop cleanly."""
    server = OrchestratorServer(cfg)
    await server.start()
    sdnotify.notify("READY=1")
    try:
        await asyncio.Event().wait()
    finally:
        sdnotify.notify("STOPPING=1")
        _log.info("orchestrator.stopping")
        await server.stop()
        _log.info("orchestrator.stopped")
