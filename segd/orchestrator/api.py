"""The orchestrator's REST API under `/v1/orch/`: admin only, JSON in and out.

One route table (`ROUTES`) drives the handlers and the OpenAPI document at
`/v1/orch/openapi.json` (the one route that needs no token). Every handler
authenticates (bearer token) and answers errors as `{"error": CODE, "message":
TEXT}` by itself, so the routes work the same on the orchestrator's own
listener and mounted on another application (the all-in-one mode) whatever
that application's middlewares are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from segd import log, wire
from segd.config import DEFAULT_RATE_LIMIT_BURST, DEFAULT_RATE_LIMIT_PER_S
from segd.errors import InvalidInput, RateLimited, SegdError, Unauthorized, Unavailable
from segd.orchestrator import validate
from segd.orchestrator import wire as owire
from segd.orchestrator.service import Orchestrator
from segd.ratelimit import HOLD_S, TokenBuckets, source_of
from segd.server import openapi
from segd.server.http import BODY_ERRORS, bad_body, decoded

PREFIX = "/v1/orch"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TokenCheck = Callable[[str], bool]
T = TypeVar("T")

_log = log.get(__name__)
_enc = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t)
    for t in (owire.ProfileIn, owire.KeyIn, owire.NodeIn, owire.RunIn, owire.ChangeIn)
}


def json_response(value: object, status: int = 200) -> web.Response:
    return web.Response(body=_enc.encode(value), status=status, content_type="application/json")


def _one_line(text: str) -> str:
    """Printable characters only: anything else is escaped as in a Python literal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def error_response(e: SegdError) -> web.Response:
    resp = json_response(wire.Error(error=e.code, message=_one_line(e.message) or e.code), e.status)
    if e.status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="segd-orchestrator"'
    if isinstance(e, RateLimited):
        resp.headers["Retry-After"] = str(e.retry_after)
    return resp


class OrchestratorAPI:
    """The `/v1/orch/` handlers around one `Orchestrator`.

    `orch` may be bound later (`bind`), e.g. by an application's cleanup
    context; `accept_token` lets a host application admit its own admin token
    as well as the orchestrator's. Requests on routes that need no token, and
    requests with a refused token, are charged to their source's bucket of
    `limiter`: beyond it they are answered 429, held back for `HOLD_S` (a good
    token is never limited).
    """

    def __init__(
        self,
        orch: Orchestrator | None = None,
        *,
        max_body_bytes: int = 65536,
        accept_token: TokenCheck | None = None,
        limiter: TokenBuckets | None = None,
    ) -> None:
        self._orch = orch
        self._max_body = max_body_bytes
        self._accept_token = accept_token
        if limiter is None:
            limiter = TokenBuckets(DEFAULT_RATE_LIMIT_PER_S, DEFAULT_RATE_LIMIT_BURST)
        self._limiter = limiter

    def bind(self, orch: Orchestrator | None) -> None:
        self._orch = orch

    @property
    def orch(self) -> Orchestrator:
        if self._orch is None:
            raise Unavailable("the orchestrator is not running")
        return self._orch

    def routes(self) -> list[web.RouteDef]:
        return [
            web.route(
                r.method,
                r.path,
                self._endpoint(getattr(self, r.handler.__name__), r.auth),
                expect_handler=_expect,
            )
            for r in ROUTES
        ]

    def public(self, fn: Handler) -> Handler:
        """`fn` as a route that needs no token (rate-limited per source)."""
        return self._endpoint(fn, "none")

    # ---- plumbing -----------------------------------------------------------------

    def _endpoint(self, fn: Handler, auth: str = "admin") -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                if auth == "none":
                    self._charge(request)
                else:
                    self._authorize(request)
                return await fn(request)
            except SegdError as err:
                if isinstance(err, RateLimited):
                    await asyncio.sleep(HOLD_S)
                if err.status >= 500:
                    _log.warning(
                        "request.failed",
                        method=request.method,
                        path=request.path,
                        error=err.code,
                        message=err.message,
                    )
                return error_response(err)
            except Exception:
                _log.exception("request.crashed", method=request.method, path=request.path)
                return error_response(SegdError("internal error", code="internal", status=500))

        return handle

    def _authorize(self, request: web.Request) -> None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        # Header bytes that are not UTF-8 arrive as lone surrogates, which cannot
        # be hashed; no admin token has anything but printable ASCII.
        if scheme.lower() == "bearer" and token and token.isascii() and token.isprintable():
            if self.orch.check_token(token):
                return
            if self._accept_token is not None and self._accept_token(token):
                return
        self._charge(request)
        raise Unauthorized("missing or invalid admin token")

    def _charge(self, request: web.Request) -> None:
        """One request of its source's bucket; RateLimited when it is empty."""
        wait = self._limiter.take(source_of(request.remote), time.monotonic())
        if wait > 0:
            raise RateLimited(wait)

    def _too_large(self) -> SegdError:
        return SegdError(
            f"request body larger than {self._max_body} bytes", code="too_large", status=413
        )

    async def _body(self, request: web.Request, typ: type[T]) -> T:
        if request.content_length is not None and request.content_length > self._max_body:
            raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > self._max_body:
                    raise self._too_large()
                chunks.append(chunk)
            body = decoded(request, b"".join(chunks), self._max_body)
        except BODY_ERRORS:
            raise bad_body(request) from None
        except SegdError as e:
            raise (self._too_large() if e.status == 413 else e) from None
        try:
            value: T = _decoders[typ].decode(body)
        except msgspec.ValidationError as e:
            raise InvalidInput(f"invalid request: {e}") from None
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            # msgspec raises UnicodeDecodeError, not DecodeError, for a string that is not UTF-8.
            raise SegdError(f"malformed JSON: {e}", code="invalid_json", status=400) from None
        return value

    @staticmethod
    def _no_query(request: web.Request, allowed: frozenset[str] = frozenset()) -> None:
        unknown = sorted(set(request.query) - allowed)
        if unknown:
            raise InvalidInput(f"unknown query parameter {unknown[0]!r}")

    # ---- handlers -----------------------------------------------------------------

    async def add_profile(self, request: web.Request) -> web.Response:
        p = await self._body(request, owire.ProfileIn)
        return json_response(await self.orch.add_profile(p), 201)

    async def list_profiles(self, request: web.Request) -> web.Response:
        self._no_query(request)
        return json_response(await self.orch.profiles())

    async def set_profile_key(self, request: web.Request) -> web.Response:
        k = await self._body(request, owire.KeyIn)
        return json_response(await self.orch.set_profile_key(request.match_info["name"], k))

    async def remove_profile(self, request: web.Request) -> web.Response:
        await self.orch.remove_profile(request.match_info["name"])
        return web.Response(status=204)

    async def add_node(self, request: web.Request) -> web.Response:
        n = await self._body(request, owire.NodeIn)
        return json_response(await self.orch.add_node(n), 201)

    async def list_nodes(self, request: web.Request) -> web.Response:
        self._no_query(request)
        return json_response(await self.orch.nodes())

    async def remove_node(self, request: web.Request) -> web.Response:
        await self.orch.remove_node(request.match_info["name"])
        return web.Response(status=204)

    async def run(self, request: web.Request) -> web.Response:
        r = await self._body(request, owire.RunIn)
        return json_response(await self.orch.run(r), 201)

    async def ps(self, request: web.Request) -> web.Response:
        self._no_query(request, frozenset({"node"}))
        return json_response(await self.orch.ps(request.query.get("node")))

    async def rm(self, request: web.Request) -> web.Response:
        return json_response(await self.orch.rm(request.match_info["id"]))

    async def change(self, request: web.Request) -> web.Response:
        c = await self._body(request, owire.ChangeIn)
        return json_response(await self.orch.change(request.match_info["id"], c))

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=document(), content_type="application/json")


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` as aiohttp answers it; any other expectation a JSON 417
    (aiohttp runs this before any handler or middleware)."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version != HttpVersion11:
        return None
    if expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the response
        return None
    return error_response(
        SegdError(f"cannot meet the expectation {expect!r}", code="expectation_failed", status=417)
    )


# ---- the route table and its OpenAPI document -----------------------------------------


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    type: str
    description: str


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Callable[..., Any]  # an OrchestratorAPI method
    summary: str
    body: type | None = None
    response: Any = None  # a msgspec-describable type, or None for 204
    status: int = 200
    query: tuple[Param, ...] = ()
    auth: str = "admin"


A = OrchestratorAPI
# fmt: off
ROUTES: tuple[Route, ...] = (
    Route("POST", PREFIX + "/profiles", A.add_profile, "Add a container profile",
          owire.ProfileIn, owire.Profile, 201),
    Route("GET", PREFIX + "/profiles", A.list_profiles, "List container profiles (keys masked)",
          response=list[owire.Profile]),
    Route("DELETE", PREFIX + "/profiles/{name}", A.remove_profile,
          "Remove a container profile no container uses"),
    Route("PUT", PREFIX + "/profiles/{name}/key", A.set_profile_key,
          "Set a container profile's pairing key (for the containers started next)",
          owire.KeyIn, owire.Profile),
    Route("POST", PREFIX + "/nodes", A.add_node, "Add a node (a Docker engine)", owire.NodeIn,
          owire.Node, 201),
    Route("GET", PREFIX + "/nodes", A.list_nodes, "List nodes", response=list[owire.Node]),
    Route("DELETE", PREFIX + "/nodes/{name}", A.remove_node, "Remove a node with no containers"),
    Route("POST", PREFIX + "/run", A.run, "Start containers of a profile (all or nothing)",
          owire.RunIn, list[owire.Container], 201),
    Route("GET", PREFIX + "/containers", A.ps, "List containers with their live state",
          response=list[owire.Container],
          query=(Param("node", "string", "only the containers of this node"),)),
    Route("DELETE", PREFIX + "/containers/{id}", A.rm, "Remove a container (id, prefix or name)",
          response=owire.Removed),
    Route("POST", PREFIX + "/containers/{id}/change", A.change,
          "Replace a container by one of another profile", owire.ChangeIn, owire.Changed),
    Route("GET", PREFIX + "/openapi.json", A.openapi, "This document", response=dict[str, Any],
          auth="none"),
)
# fmt: on

_NO_NUL = "^[^\\u0000]*$"
_PATH = {
    "type": "string",
    "maxLength": validate.MAX_PATH,
    "pattern": "^(/[^\\u0000-\\u001f\\u007f]*)?$",
}
_NAME = openapi.named(validate.NAME_RE)
CONSTRAINTS: openapi.Constraints = {
    "ProfileIn": {
        "name": _NAME,
        "image": openapi.named(validate.IMAGE_RE),
        "pairing_key": openapi.named(validate.KEY_RE),
        "command": {
            "type": "array",
            "maxItems": validate.MAX_ARGS,
            "items": {"type": "string", "maxLength": validate.MAX_ARG, "pattern": _NO_NUL},
        },
        "env": {
            "type": "object",
            "maxProperties": validate.MAX_ENV,
            "propertyNames": {"pattern": openapi.pattern(validate.ENV_KEY_RE)},
            "additionalProperties": {
                "type": "string",
                "maxLength": validate.MAX_ARG,
                "pattern": _NO_NUL,
            },
        },
        "networks": {
            "type": "array",
            "maxItems": validate.MAX_NETWORKS,
            "uniqueItems": True,
            "items": {**openapi.named(validate.NETWORK_RE), "not": {"const": "host"}},
        },
        "labels": openapi.labels(),
        "description": {
            "type": "string",
            "maxLength": validate.MAX_DESCRIPTION,
            "pattern": "^[^\\u0000-\\u001f\\u007f]*$",
        },
    },
    "NodeIn": {
        "name": _NAME,
        "endpoint": {
            "type": "string",
            "pattern": "^(unix:///[^\\u0000]*|"
            + openapi.pattern(validate.TCP_RE).removeprefix("^").removesuffix("$")
            + ")$",
        },
        "tls_cert": _PATH,
        "tls_key": _PATH,
        "tls_ca": _PATH,
    },
    "RunIn": {
        "profile": _NAME,
        "node": {"anyOf": [_NAME, {"type": "null"}]},
        "count": openapi.bounded(1, validate.MAX_RUN),
    },
    "ChangeIn": {"profile": _NAME},
    "KeyIn": {"pairing_key": openapi.named(validate.KEY_RE)},
}
ERRORS = {
    "4XX": (
        "Bad input, unauthorised, not found, in use, or refused by the node; 429 (with "
        "Retry-After) when one address sends too many requests without a token or with a "
        "refused one"
    ),
    "502": "The node failed",
    "503": "The store or the node is unavailable, or too many connections (busy)",
}


@functools.cache
def document() -> bytes:
    """The OpenAPI document of `ROUTES`."""
    return openapi.document(
        ROUTES, title="segd orchestrator API", constraints=CONSTRAINTS, errors=ERRORS
    )
