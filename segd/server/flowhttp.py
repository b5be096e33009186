"""The flow answers that are streams: the JSON-lines export and the live
server-sent events (`GET /v1/flows/export`, `GET /v1/flows/stream`).

A stream sends a comment at once and then every `KEEPALIVE_S` while quiet (so
proxies and clients keep it open), an event `flow` per new matching flow and,
before it, an event `lost` with how many flows this stream missed because its
reader fell behind. It ends when the client goes (noticed within `GONE_CHECK_S`,
so a client gone frees its place among `max_stream_clients`) or the server
stops.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
from aiohttp import web

from segd.server import flowquery
from segd.server.service import Service

MAX_FLOW_BODY = 4 * 1024 * 1024  # a batch of `wire.MAX_FLOW_BATCH` records fits
KEEPALIVE_S = 15.0
GONE_CHECK_S = 1.0

_enc = msgspec.json.Encoder()


async def export(request: web.Request, svc: Service) -> web.StreamResponse:
    flt = flowquery.parse(request.query, svc.dims)
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    async for flows in svc.flows.export(flt):
        await resp.write(b"".join(_enc.encode(f) + b"\n" for f in flows))
    await resp.write_eof()
    return resp


def event(kind: str, data: object) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), _enc.encode(data))


async def stream(request: web.Request, svc: Service) -> web.StreamResponse:
    flt = flowquery.parse(request.query, svc.dims)
    sub = svc.flows.subscribe(flt)
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    try:
        await resp.prepare(request)
        await resp.write(b": segd flows\n\n")
        quiet = 0.0
        while not svc.flows.closing:
            try:
                f = await asyncio.wait_for(sub.queue.get(), GONE_CHECK_S)
            except TimeoutError:
                if _gone(request):
                    break
                quiet += GONE_CHECK_S
                if quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    await resp.write(b": keepalive\n\n")
                continue
            quiet = 0.0
            if f is None:  # the server is stopping
                break
            lost = sub.take_dropped()
            if lost:
                await resp.write(event("lost", {"lost": lost}))
            await resp.write(event("flow", f))
    except (ConnectionResetError, ConnectionError):
        pass  # the client went
    finally:
        svc.flows.unsubscribe(sub)
    with contextlib.suppress(ConnectionResetError, ConnectionError):
        await resp.write_eof()
    return resp


def _gone(request: web.Request) -> bool:
    """Whether the client closed its connection (aiohttp goes on with the handler)."""
    transport = request.transport
    return transport is None or transport.is_closing()
