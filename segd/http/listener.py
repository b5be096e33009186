"""segd's HTTP listeners: how many connections, for how long, and JSON for what
aiohttp refuses.

Left to itself aiohttp keeps a connection that never sends a byte for an hour
and one whose headers trickle in for as long as they trickle; one client
holding a thousand of them uses up the process's open files and nobody else is
accepted. Every segd listener (server, orchestrator, all-in-one) runs through
`ListenerRunner` and `ListenerSite` instead, with a `[*.connections]` section:

- A new connection must send its first request's headers within
  `header_timeout_s`; a later request, within `header_timeout_s` of its first
  byte. A body must arrive within `body_timeout_s` of its headers, and a
  connection with no request in progress is closed after `idle_timeout_s`. A
  request being handled (an agent's long-poll among them) is never cut here.
- At most `max_open` connections are held, counted from the accept (a TLS
  handshake included: it must end within `header_timeout_s`) to the close,
  and never more than the open-files limit leaves after a reserve for the
  store and the rest of the process. One more closes the connection that has
  waited longest without a request in progress (after those, one still sending
  its body); when every connection is serving a request the newcomer gets a
  503 `busy` and is closed.
- What aiohttp's parser refuses before segd sees it (a malformed request
  line, headers too long, conflicting framing) is answered as `{"error",
  "message"}` too. aiohttp leaves bodies encoded and segd decodes them
  (`segd.http.body.decoded`); an encoding other than gzip, deflate or
  identity is refused with 415, whatever decoders are installed.

Which connections are kept, and which one makes room, is `segd.http.connections`;
this module tells it what each connection is doing.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError, PayloadEncodingError
from aiohttp.streams import StreamReader

from segd import log
from segd.config import ConnectionLimits, parse_listen
from segd.http.body import ENCODED_BODY
from segd.http.connections import Guard, gate
from segd.http.errors import error_response

_log = log.get("segd.http.listener")

BACKLOG = 128
ENCODINGS = frozenset({"", "identity", "gzip", "deflate"})


class _Handler(web.RequestHandler):
    """aiohttp's connection handler with segd's deadlines, states and JSON errors."""

    def __init__(self, manager: _Server, loop: asyncio.AbstractEventLoop) -> None:
        limits = manager.guard.limits
        super().__init__(
            manager,
            loop=loop,
            keepalive_timeout=limits.idle_timeout_s,
            access_log=None,  # type: ignore[arg-type]  # aiohttp takes None: no access log
            auto_decompress=False,  # segd decodes (segd.http.body.decoded), within its limits
        )
        self._guard = manager.guard
        self._fd = -1
        self._deadline: asyncio.TimerHandle | None = None
        self._payload: StreamReader | None = None  # of the request in progress
        self._body_due = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        self._arm(self._guard.limits.header_timeout_s, self._headers_late)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._payload is None and self._deadline is None and data:
            self._arm(self._guard.limits.header_timeout_s, self._headers_late)
        super().data_received(data)
        if self._body_due and self._payload is not None and self._payload.is_eof():
            self._body_due = False
            self._disarm()
            self._guard.table.busy(self._fd)

    def request_started(self, payload: StreamReader) -> None:
        self._disarm()
        self._payload = payload
        if payload.is_eof():
            self._guard.table.busy(self._fd)
        else:
            self._body_due = True
            self._guard.table.reading(self._fd)
            self._arm(self._guard.limits.body_timeout_s, self._body_late)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._disarm()
            self._payload = None
            self._body_due = False
            self._guard.table.quiet(self._fd)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request aiohttp could not parse (or a handler crash) as `{error, message}`."""
        if request.writer.output_size > 0:
            raise ConnectionError("the answer has begun; cannot send an error instead")
        if isinstance(exc, PayloadEncodingError):
            code = "bad_body"  # framing of the body: chunks, Content-Length
        elif status < 500:
            code = "bad_request"
        else:
            code = "internal_error"
            _log.error("http.internal_error", exc_info=exc)
        text = exc.message if isinstance(exc, HttpProcessingError) else message or code
        _log.debug("http.bad_request", status=status, peer=str(request.remote), message=text)
        resp = error_response(status, code, text or code)
        resp.force_close()
        return resp

    def _arm(self, seconds: float, fn: Callable[[], None]) -> None:
        self._disarm()
        self._deadline = asyncio.get_running_loop().call_later(seconds, fn)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if self._payload is None:
            _log.debug("http.header_timeout", fd=self._fd)
            self.force_close()

    def _body_late(self) -> None:
        self._deadline = None
        if self._body_due:
            _log.debug("http.body_timeout", fd=self._fd)
            self.force_close()


RequestFactory = Callable[
    [
        RawRequestMessage,
        StreamReader,
        web.RequestHandler,
        AbstractStreamWriter,
        "asyncio.Task[None]",
    ],
    web.BaseRequest,
]


class _Server(web.Server):
    """The application's request handler and factory, served by `_Handler`s."""

    def __init__(self, base: web.Server, guard: Guard) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(
            _refuse_unknown_encodings(base.request_handler),
            request_factory=_noting_start(base.request_factory),
            handler_cancellation=base.handler_cancellation,
            loop=loop,
        )
        self.guard = guard
        self._handler_loop = loop

    def __call__(self) -> web.RequestHandler:
        return _Handler(self, self._handler_loop)


def _noting_start(inner: RequestFactory) -> RequestFactory:
    def factory(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: web.RequestHandler,
        writer: AbstractStreamWriter,
        task: Any,
    ) -> web.BaseRequest:
        if isinstance(protocol, _Handler):
            protocol.request_started(payload)
        request = inner(message, payload, protocol, writer, task)
        request[ENCODED_BODY] = True
        return request

    return factory


def _refuse_unknown_encodings(
    inner: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        for enc in request.headers.getall(hdrs.CONTENT_ENCODING, ()):
            if enc.strip().lower() not in ENCODINGS:
                return error_response(
                    415,
                    "unsupported_media_type",
                    f"Content-Encoding {enc!r} is not supported: use gzip, deflate or none",
                )
        return await inner(request)

    return handle


class ListenerRunner(web.AppRunner):
    """An `AppRunner` whose connections are guarded by `limits` (whatever the site)."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, access_log=None, **kwargs)
        self.guard = Guard(limits)

    async def _make_server(self) -> web.Server:
        return _Server(await super()._make_server(), self.guard)


class ListenerSite(web.BaseSite):
    """TCP listening sockets (one per address of `listen`, or `sock`) of a `ListenerRunner`."""

    def __init__(
        self,
        runner: ListenerRunner,
        listen: str = "",
        *,
        sock: socket.socket | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=BACKLOG)
        self._guard = runner.guard
        self._listen = listen
        self._sock = sock
        self._servers: list[asyncio.Server] = []

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._listen or 'socket'}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        socks = [self._sock] if self._sock is not None else await _bind(self._listen)
        gates = [gate(s, self._guard) for s in socks]
        server = self._runner.server
        assert server is not None
        handshake_s = self._guard.limits.header_timeout_s if self._ssl_context else None
        try:
            for g in gates:
                self._servers.append(
                    await loop.create_server(
                        server,
                        sock=g,
                        ssl=self._ssl_context,
                        backlog=self._backlog,
                        ssl_handshake_timeout=handshake_s,
                    )
                )
        except BaseException:
            for srv in self._servers:
                srv.close()
            for g in gates:
                g.close()
            raise
        self._server = self._servers[0]

    async def stop(self) -> None:
        for srv in self._servers[1:]:
            srv.close()
        await super().stop()


async def _bind(listen: str) -> list[socket.socket]:
    """A bound socket per address of `listen` (as `loop.create_server` would bind)."""
    host, port = parse_listen(listen)
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    out: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, type_, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            s = socket.socket(family, type_, proto)
            out.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL:
                    raise
                out.pop().close()  # that address family is not configured here
        if not out:
            raise OSError(errno.EADDRNOTAVAIL, f"no address of {host} can be bound")
    except BaseException:
        for s in out:
            s.close()
        raise
    return out
