"""Building and running the server: the aiohttp app, its listener and its lifecycle.

`build_app(cfg)` gives an application whose `cleanup_ctx` opens the service
(store, keys, compiler) on start and closes it on cleanup; tests and the
all-in-one mode run it in-process. `ServerRunner` listens on the configured
address (TLS when configured) with the `[server.connections]` limits
(segd.http.listener); `run_server` runs until SIGTERM/SIGINT, a stop
event or cancellation, then stops accepting, releases long-polls, drains
in-flight requests for up to `shutdown_timeout` seconds and closes the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator

from aiohttp import web

from segd import log, sdnotify
from segd.config import ServerConfig
from segd.errors import SegdError
from segd.http.routes import application
from segd.http.runner import Runner
from segd.server import housekeeping, openapi
from segd.server.api import OPENAPI, ROUTES, RUNTIME, Runtime, add_routes
from segd.server.auth import NonceCache
from segd.server.service import Clock, Service

_log = log.get("segd.server")

DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0


def service_of(app: web.Application) -> Service:
    """The running service of an app built by `build_app`."""
    svc = app[RUNTIME].svc
    if svc is None:
        raise RuntimeError("the server app has not started")
    return svc


def build_app(cfg: ServerConfig, *, clock: Clock = time.time) -> web.Application:
    holder = Runtime()
    app = application(cfg.max_body_bytes)
    app[RUNTIME] = holder
    app[OPENAPI] = openapi.document(ROUTES)
    add_routes(app)

    async def service_ctx(app: web.Application) -> AsyncIterator[None]:
        svc = await Service.open(cfg, clock)
        holder.svc = svc
        holder.nonces = NonceCache(cfg.request_skew_s + cfg.request_future_skew_s)
        chores = asyncio.create_task(housekeeping.run(svc), name="segd-housekeeping")
        try:
            yield
        finally:
            holder.svc = holder.nonces = None
            chores.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await chores
            with contextlib.suppress(SegdError):  # the summaries are logged all the same
                await svc.guard.flush(svc.store, svc.clock(), everything=True)
            await svc.close()
            _log.info("server.closed")

    async def on_shutdown(app: web.Application) -> None:
        if holder.svc is not None:
            holder.svc.hub.close()
            holder.svc.flows.close()

    app.cleanup_ctx.append(service_ctx)
    app.on_shutdown.append(on_shutdown)
    return app


class ServerRunner:
    """The server app on its listener: `await start()`, then `await stop()`."""

    def __init__(
        self,
        cfg: ServerConfig,
        *,
        clock: Clock = time.time,
        sock: socket.socket | None = None,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
    ) -> None:
        self.cfg = cfg
        self.app = build_app(cfg, clock=clock)
        self._runner = Runner(
            self.app,
            listen=cfg.listen,
            limits=cfg.connections,
            tls=cfg.tls,
            sock=sock,
            shutdown_timeout=shutdown_timeout,
        )
        self.url = ""

    @property
    def service(self) -> Service:
        return service_of(self.app)

    async def start(self) -> None:
        await self._runner.start()
        if not self._runner.url:
            await self._runner.stop()
            raise RuntimeError("server is not listening on TCP")
        self.url = self._runner.url
        _log.info("server.listening", url=self.url, data_dir=self.cfg.data_dir)

    async def stop(self) -> None:
        _log.info("server.stopping")
        await self._runner.stop()


async def run_server(
    cfg: ServerConfig,
    *,
    stop: asyncio.Event | None = None,
    clock: Clock = time.time,
    handle_signals: bool = True,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
) -> None:
    """Serve until SIGTERM/SIGINT (when `handle_signals`), `stop` is set, or cancelled."""
    stop = stop or asyncio.Event()
    runner = ServerRunner(cfg, clock=clock, shutdown_timeout=shutdown_timeout)
    await runner.start()
    sdnotify.notify("READY=1")
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
    for s in signals:
        loop.add_signal_handler(s, stop.set)
    try:
        await stop.wait()
    finally:
        sdnotify.notify("STOPPING=1")
        for s in signals:
            loop.remove_signal_handler(s)
        await runner.stop()
