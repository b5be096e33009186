"""The orchestrator's REST API under `/v1/orch/`: admin only, JSON in and out.

Every handler authenticates (bearer token) and answers errors as
`{"error": CODE, "message": TEXT}` by itself, so the routes work the same on
the orchestrator's own listener and mounted on another application (the
all-in-one mode) whatever that application's middlewares are.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from segd import log, wire
from segd.errors import InvalidInput, SegdError, Unauthorized, Unavailable
from segd.orchestrator import wire as owire
from segd.orchestrator.service import Orchestrator

PREFIX = "/v1/orch"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TokenCheck = Callable[[str], bool]
T = TypeVar("T")

_log = log.get(__name__)
_enc = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t) for t in (owire.ProfileIn, owire.NodeIn, owire.RunIn, owire.ChangeIn)
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
    return resp


class OrchestratorAPI:
    """The `/v1/orch/` handlers around one `Orchestrator`.

    `orch` may be bound later (`bind`), e.g. by an application's cleanup
    context; `accept_token` lets a host application admit its own admin token
    as well as the orchestrator's.
    """

    def __init__(
        self,
        orch: Orchestrator | None = None,
        *,
        max_body_bytes: int = 65536,
        accept_token: TokenCheck | None = None,
    ) -> None:
        self._orch = orch
        self._max_body = max_body_bytes
        self._accept_token = accept_token

    def bind(self, orch: Orchestrator | None) -> None:
        self._orch = orch

    @property
    def orch(self) -> Orchestrator:
        if self._orch is None:
            raise Unavailable("the orchestrator is not running")
        return self._orch

    def routes(self) -> list[web.RouteDef]:
        e = self._endpoint
        return [
            web.post(PREFIX + "/profiles", e(self.add_profile)),
            web.get(PREFIX + "/profiles", e(self.list_profiles)),
            web.delete(PREFIX + "/profiles/{name}", e(self.remove_profile)),
            web.post(PREFIX + "/nodes", e(self.add_node)),
            web.get(PREFIX + "/nodes", e(self.list_nodes)),
            web.delete(PREFIX + "/nodes/{name}", e(self.remove_node)),
            web.post(PREFIX + "/run", e(self.run)),
            web.get(PREFIX + "/containers", e(self.ps)),
            web.delete(PREFIX + "/containers/{id}", e(self.rm)),
            web.post(PREFIX + "/containers/{id}/change", e(self.change)),
        ]

    # ---- plumbing -----------------------------------------------------------------

    def _endpoint(self, fn: Handler) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                self._authorize(request)
                return await fn(request)
            except SegdError as err:
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
        raise Unauthorized("missing or invalid admin token")

    async def _body(self, request: web.Request, typ: type[T]) -> T:
        if request.content_length is not None and request.content_length > self._max_body:
            raise SegdError(
                f"request body larger than {self._max_body} bytes", code="too_large", status=413
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > self._max_body:
                raise SegdError(
                    f"request body larger than {self._max_body} bytes", code="too_large", status=413
                )
            chunks.append(chunk)
        try:
            value: T = _decoders[typ].decode(b"".join(chunks))
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
