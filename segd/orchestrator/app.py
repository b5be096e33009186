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
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from segd import __version__, log, sdnotify
from segd.config import OrchestratorConfig
from segd.errors import SegdError
from segd.listener import ListenerRunner, ListenerSite
from segd.orchestrator import wire
from segd.orchestrator.api import OrchestratorAPI, TokenCheck, error_response, json_response
from segd.orchestrator.service import Orchestrator
from segd.ratelimit import TokenBuckets
from segd.tls import listener_context

SHUTDOWN_TIMEOUT_S = 10.0  # how long in-flight requests may finish on stop
API_KEY = web.AppKey("orchestrator_api", OrchestratorAPI)

_log = log.get(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own errors (unknown route, wrong method) as `{error, message}`."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "http_error")
        return error_response(SegdError(e.reason, code=code, status=e.status))


def limiter_of(cfg: OrchestratorConfig) -> TokenBuckets:
    return TokenBuckets(cfg.rate_limit_per_s, cfg.rate_limit_burst)


async def _health(request: web.Request) -> web.Response:
    return json_response(wire.Health(status="ok", version=__version__))


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
    app = web.Application(middlewares=[_json_errors], client_max_size=cfg.max_body_bytes)
    api = add_routes(
        app,
        orch,
        max_body_bytes=cfg.max_body_bytes,
        accept_token=accept_token,
        limiter=limiter_of(cfg),
    )
    app[API_KEY] = api
    app.router.add_get("/v1/health", api.public(_health))
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
        self._runner: ListenerRunner | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Bound (host, port) pairs; useful with port 0."""
        if self._runner is None:
            return []
        return [(str(a[0]), int(a[1])) for a in self._runner.addresses]

    async def start(self) -> None:
        try:
            ctx = listener_context(self.cfg.tls)
        except (OSError, ssl.SSLError) as e:
            raise SegdError(f"cannot load the listener's TLS files: {e}") from None
        if self.orch is None:
            self.orch = await Orchestrator.open(self.cfg)
        app = build_app(self.cfg, self.orch)
        runner = ListenerRunner(app, self.cfg.connections, shutdown_timeout=self._shutdown_timeout)
        try:
            await runner.setup()
            self._runner = runner
            await ListenerSite(runner, self.cfg.listen, ssl_context=ctx).start()
        except OSError as e:
            await self.stop()
            raise SegdError(f"cannot listen on {self.cfg.listen}: {e.strerror or e}") from None
        except BaseException:
            await self.stop()
            raise
        _log.info(
            "orchestrator.listening",
            listen=self.cfg.listen,
            tls=ctx is not None,
            data_dir=self.cfg.data_dir,
        )

    async def stop(self) -> None:
        """Stop accepting, drain in-flight requests (with a timeout), close."""
        try:
            if self._runner is not None:
                runner, self._runner = self._runner, None
                await runner.cleanup()
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
