"""A pass-through in front of the server that keeps a copy of every flow batch an
agent sends (`POST /v1/agent/flows`), so a test can read what the agent reported
whatever the server does with it. Every request goes on to the server unchanged
(the agent's signature covers method, path and body); a server without flow
ingest (404) is answered 204 for that route."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable

import aiohttp
import msgspec
from aiohttp import web

from segd.wire import FlowBatchIn, FlowRecordIn
from tests.e2e.stack import free_port

_HOP = {"host", "content-length", "transfer-encoding", "connection"}


class FlowTap:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.batches: list[FlowBatchIn] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def __enter__(self) -> FlowTap:
        self._thread.start()
        assert self._ready.wait(10), "flow tap did not start"
        return self

    def __exit__(self, *_: object) -> None:
        # Long-polls may be open through the tap: they are cut, not waited for.
        with contextlib.suppress(TimeoutError):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def records(self) -> list[FlowRecordIn]:
        with self._lock:
            return [r for b in self.batches for r in b.records]

    def lost(self) -> int:
        with self._lock:
            return sum(b.lost for b in self.batches)

    def wait(self, pred: Callable[[FlowRecordIn], bool], timeout: float, what: str) -> FlowRecordIn:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [r for r in self.records() if pred(r)]
            if hits:
                return hits[0]
            time.sleep(0.2)
        raise AssertionError(f"no flow record {what} within {timeout}s: {self.records()}")

    # ---- on the tap's own loop ------------------------------------------------------------

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        flows = request.method == "POST" and request.path == "/v1/agent/flows"
        if flows:
            batch = msgspec.json.decode(body, type=FlowBatchIn)
            with self._lock:
                self.batches.append(batch)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body or None, headers=headers
        ) as resp:
            data = await resp.read()
            if flows and resp.status == 404:
                return web.Response(status=204)
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
            return web.Response(status=resp.status, body=data, headers=out)
