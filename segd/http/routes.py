"""Route declarations and the adapter that runs them.

A `Route` names its method and path, its handler, who may call it (`auth`:
the API's own words, e.g. `none`, `admin`, `agent`), the msgspec type of its
body and of its answer, its status and its query parameters; the same table
drives the OpenAPI document (`segd.http.openapi`).

`adapt(route, authenticate)` gives the aiohttp handler: the API's
`authenticate` hook runs with the request, the route and a lazy `Body`, and
answers the context the handler gets (`Call.ctx`): a hook that needs the raw
body (a signature over it) reads it; a hook that refuses a request never reads
it. Then unknown query parameters are refused, the body is read (within the
limit) and decoded strictly into the route's type, the handler runs, and its
answer is encoded: None is 204, a `web.StreamResponse` is sent as is, anything
else is JSON with the route's status. Every error is answered by
`errors.answer`, so a route answers the same whatever application it is on.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Literal, TypeVar

import msgspec
from aiohttp import web

from segd.http import errors
from segd.http.body import read_body
from segd.http.params import no_unknown

C = TypeVar("C")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    type: Literal["integer", "number", "string"]
    description: str


@dataclasses.dataclass(frozen=True)
class Call(Generic[C]):
    """One authenticated, decoded request as a handler sees it."""

    request: web.Request
    ctx: C  # what the API's authenticate hook answered
    body: object

    def body_as(self, t: type[T]) -> T:
        assert isinstance(self.body, t)
        return self.body

    def arg(self, name: str) -> str:
        return self.request.match_info[name]


Handler = Callable[[Call[C]], Awaitable[Any]]


@dataclasses.dataclass(frozen=True)
class Route(Generic[C]):
    method: str
    path: str
    handler: Handler[C]
    summary: str
    auth: str = "admin"
    body: type | None = None
    response: Any = None  # a msgspec-describable type, or None for 204
    status: int = 200
    query: tuple[Param, ...] = ()
    max_body: int | None = None  # this route's body limit, if not the app's
    media: str = "application/json"  # of the answer


class Body:
    """A request's body, read once on first use."""

    def __init__(self, request: web.Request, limit: int | None) -> None:
        self._request = request
        self._limit = limit
        self._raw: bytes | None = None

    async def raw(self) -> bytes:
        if self._raw is None:
            self._raw = await read_body(self._request, self._limit)
        return self._raw


Authenticate = Callable[[web.Request, Route[C], Body], Awaitable[C]]


def adapt(
    route: Route[C], authenticate: Authenticate[C], *, max_body: int | None = None
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of `route` (`max_body`: the app's limit by default)."""
    decoder: msgspec.json.Decoder[Any] | None = (
        msgspec.json.Decoder(route.body) if route.body is not None else None
    )
    allowed = frozenset(p.name for p in route.query)
    challenge = route.auth == "admin"

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            body = Body(request, route.max_body or max_body)
            ctx = await authenticate(request, route, body)
            no_unknown(request, allowed)
            raw = await body.raw()
            value = decoder.decode(raw.strip() or b"{}") if decoder is not None else None
            result = await route.handler(Call(request, ctx, value))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            return await errors.answer(request, e, challenge=challenge)
        if isinstance(result, web.StreamResponse):
            return result
        if result is None:
            return web.Response(status=204)
        return errors.json_response(result, route.status)

    return handle


def route_defs(
    routes: tuple[Route[C], ...], authenticate: Authenticate[C], *, max_body: int | None = None
) -> list[web.RouteDef]:
    return [
        web.route(
            r.method,
            r.path,
            adapt(r, authenticate, max_body=max_body),
            expect_handler=errors.expect_handler,
        )
        for r in routes
    ]


def application(max_body: int) -> web.Application:
    """An empty application with the kit's error middleware and body limit."""
    return web.Application(client_max_size=max_body, middlewares=[errors.middleware])
