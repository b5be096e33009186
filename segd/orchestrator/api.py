"""The orchestrator's REST API under `/v1/orch/`: admin only, JSON in and out.

One route table (`ROUTES`) drives the handlers and the OpenAPI document at
`/v1/orch/openapi.json` (the one route that needs no token), through the HTTP
kit (`segd.http.routes`): `OrchestratorAPI.authenticate` checks the bearer
token, the kit reads and decodes the body and answers errors as `{"error":
CODE, "message": TEXT}` with the same codes as the server's API, so the routes
work the same on the orchestrator's own listener and mounted on another
application (the all-in-one mode) whatever that application's middlewares are.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from segd.config import DEFAULT_RATE_LIMIT_BURST, DEFAULT_RATE_LIMIT_PER_S
from segd.errors import RateLimited, Unauthorized, Unavailable
from segd.http import openapi, routes
from segd.http.routes import Body, Param
from segd.orchestrator import validate
from segd.orchestrator import wire as owire
from segd.orchestrator.service import Orchestrator
from segd.ratelimit import TokenBuckets, source_of

PREFIX = "/v1/orch"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TokenCheck = Callable[[str], bool]
Call = routes.Call[Orchestrator]
Route = routes.Route[Orchestrator]


class OrchestratorAPI:
    """Who may call the `/v1/orch/` routes, around one `Orchestrator`.

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
        return routes.route_defs(ROUTES, self.authenticate, max_body=self._max_body)

    def public(self, route: Route) -> Handler:
        """`route` (one that needs no token, rate-limited per source) as a handler."""
        return routes.adapt(route, self.authenticate, max_body=self._max_body)

    async def authenticate(self, request: web.Request, route: Route, body: Body) -> Orchestrator:
        if route.auth == "none":
            self._charge(request)
            return self.orch
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        # Header bytes that are not UTF-8 arrive as lone surrogates, which cannot
        # be hashed; no admin token has anything but printable ASCII.
        if scheme.lower() == "bearer" and token and token.isascii() and token.isprintable():
            if self.orch.check_token(token):
                return self.orch
            if self._accept_token is not None and self._accept_token(token):
                return self.orch
        self._charge(request)
        raise Unauthorized("missing or invalid admin token")

    def _charge(self, request: web.Request) -> None:
        """One request of its source's bucket; RateLimited when it is empty."""
        wait = self._limiter.take(source_of(request.remote), time.monotonic())
        if wait > 0:
            raise RateLimited(wait)


# ---- handlers ---------------------------------------------------------------------


async def add_profile(c: Call) -> owire.Profile:
    return await c.ctx.add_profile(c.body_as(owire.ProfileIn))


async def list_profiles(c: Call) -> list[owire.Profile]:
    return await c.ctx.profiles()


async def set_profile_key(c: Call) -> owire.Profile:
    return await c.ctx.set_profile_key(c.arg("name"), c.body_as(owire.KeyIn))


async def remove_profile(c: Call) -> None:
    await c.ctx.remove_profile(c.arg("name"))


async def add_node(c: Call) -> owire.Node:
    return await c.ctx.add_node(c.body_as(owire.NodeIn))


async def list_nodes(c: Call) -> list[owire.Node]:
    return await c.ctx.nodes()


async def remove_node(c: Call) -> None:
    await c.ctx.remove_node(c.arg("name"))


async def run(c: Call) -> list[owire.Container]:
    return await c.ctx.run(c.body_as(owire.RunIn))


async def ps(c: Call) -> list[owire.Container]:
    return await c.ctx.ps(c.request.query.get("node"))


async def rm(c: Call) -> owire.Removed:
    return await c.ctx.rm(c.arg("id"))


async def change(c: Call) -> owire.Changed:
    return await c.ctx.change(c.arg("id"), c.body_as(owire.ChangeIn))


async def openapi_doc(c: Call) -> web.Response:
    return web.Response(body=document(), content_type="application/json")


# ---- the route table and its OpenAPI document -----------------------------------------


# fmt: off
ROUTES: tuple[Route, ...] = (
    Route("POST", PREFIX + "/profiles", add_profile, "Add a container profile",
          body=owire.ProfileIn, response=owire.Profile, status=201),
    Route("GET", PREFIX + "/profiles", list_profiles, "List container profiles (keys masked)",
          response=list[owire.Profile]),
    Route("DELETE", PREFIX + "/profiles/{name}", remove_profile,
          "Remove a container profile no container uses"),
    Route("PUT", PREFIX + "/profiles/{name}/key", set_profile_key,
          "Set a container profile's pairing key (for the containers started next)",
          body=owire.KeyIn, response=owire.Profile),
    Route("POST", PREFIX + "/nodes", add_node, "Add a node (a Docker engine)",
          body=owire.NodeIn, response=owire.Node, status=201),
    Route("GET", PREFIX + "/nodes", list_nodes, "List nodes", response=list[owire.Node]),
    Route("DELETE", PREFIX + "/nodes/{name}", remove_node, "Remove a node with no containers"),
    Route("POST", PREFIX + "/run", run, "Start containers of a profile (all or nothing)",
          body=owire.RunIn, response=list[owire.Container], status=201),
    Route("GET", PREFIX + "/containers", ps, "List containers with their live state",
          response=list[owire.Container],
          query=(Param("node", "string", "only the containers of this node"),)),
    Route("DELETE", PREFIX + "/containers/{id}", rm, "Remove a container (id, prefix or name)",
          response=owire.Removed),
    Route("POST", PREFIX + "/containers/{id}/change", change,
          "Replace a container by one of another profile",
          body=owire.ChangeIn, response=owire.Changed),
    Route("GET", PREFIX + "/openapi.json", openapi_doc, "This document", response=dict[str, Any],
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
            "items": {"type": "string", "maxLength": validate.MAX_ARG, "pattern": _NO_NUL},
        },
        "env": {
            "propertyNames": {"pattern": openapi.pattern(validate.ENV_KEY_RE)},
            "additionalProperties": {
                "type": "string",
                "maxLength": validate.MAX_ARG,
                "pattern": _NO_NUL,
            },
        },
        "networks": {
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
        ROUTES,
        title="segd orchestrator API",
        constraints=CONSTRAINTS,
        errors=ERRORS,
        security={"admin": openapi.ADMIN_SECURITY},
    )
