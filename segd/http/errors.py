"""Errors on the wire: one code table, `{"error", "message"}` answers, the middleware.

Every error leaves as `{"error": CODE, "message": TEXT}` (wire.Error): segd
errors with their own code and status, invalid input as `invalid_input` (400),
undecodable JSON as `malformed_json` (400), aiohttp's own refusals by `CODES`
(unknown routes `not_found`, oversize bodies `body_too_large`, ...). A refused
admin token also carries `WWW-Authenticate`; a rate-limited request is held
back for `ratelimit.HOLD_S` and carries `Retry-After`. Anything unexpected is
logged and answered 500 `internal_error` without details. A message is always
one line of printable text: whatever of the request it echoes is escaped.

`answer` turns an exception into its response; route adapters use it (so a
route answers the same on any application) and so does `middleware` (for
what aiohttp raises before a route runs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from segd import log, wire
from segd.errors import RateLimited, SegdError
from segd.ratelimit import HOLD_S

_log = log.get("segd.http")
_enc = msgspec.json.Encoder()

MAX_MESSAGE = 1000

# aiohttp's refusals (raised before a route runs) by status.
CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    417: "expectation_failed",
}
INVALID_INPUT = "invalid_input"
MALFORMED_JSON = "malformed_json"
INTERNAL = "internal_error"
CHALLENGE = 'Bearer realm="segd"'


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_enc.encode(obj), status=status, content_type="application/json")


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` as one line of printable characters: others (newlines, NUL, lone
    surrogates from undecodable bytes) are escaped as in a Python literal."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response(wire.Error(error=code, message=one_line(message) or code), status)


def classify(request: web.BaseRequest, exc: Exception) -> SegdError | None:
    """`exc` as the SegdError it is answered as; None when it is unexpected."""
    match exc:
        case SegdError():
            return exc
        case msgspec.ValidationError():
            return SegdError(str(exc), code=INVALID_INPUT, status=400)
        case msgspec.DecodeError():
            return SegdError(f"request body is not valid JSON: {exc}", code=MALFORMED_JSON)
        case UnicodeDecodeError():
            # msgspec raises this (not a DecodeError) for a string that is not UTF-8.
            return SegdError(f"request body is not valid UTF-8: {exc}", code=MALFORMED_JSON)
        case web.HTTPException() if exc.status >= 400:
            if exc.status == 404:
                msg = f"no such route: {request.method} {request.path}"
            elif exc.status == 405:
                msg = f"method {request.method} is not allowed on {request.path}"
            elif exc.status == 413:
                msg = f"request body is larger than {request.client_max_size} bytes"
            else:
                msg = exc.reason
            return SegdError(msg, code=CODES.get(exc.status, "http_error"), status=exc.status)
    return None


async def answer(
    request: web.BaseRequest, exc: Exception, *, challenge: bool = False
) -> web.Response:
    """The response to `exc`; `challenge` adds `WWW-Authenticate` to a 401.
    Re-raises what is not an error (an aiohttp redirect) and cancellation."""
    if isinstance(exc, web.HTTPException) and exc.status < 400:
        raise exc
    err = classify(request, exc)
    if err is None:
        _log.error("http.internal_error", method=request.method, path=request.path, exc_info=exc)
        return error_response(500, INTERNAL, "internal server error (see server log)")
    if err.status >= 500:
        _log.warning(
            "request.failed",
            method=request.method,
            path=request.path,
            error=err.code,
            message=err.message,
        )
    if isinstance(err, RateLimited):
        await asyncio.sleep(HOLD_S)
    resp = error_response(err.status, err.code, err.message)
    if isinstance(err, RateLimited):
        resp.headers["Retry-After"] = str(err.retry_after)
    if challenge and err.status == 401:
        resp.headers["WWW-Authenticate"] = CHALLENGE
    return resp


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        return await answer(request, e)


async def expect_handler(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` as aiohttp answers it; any other expectation a JSON 417.

    aiohttp runs a route's expect handler before any middleware, so its default
    answers an unknown expectation in plain text: pass this one to `add_route`.
    """
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version != HttpVersion11:
        return None
    if expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not the response
        return None
    return error_response(417, "expectation_failed", f"cannot meet the expectation {expect!r}")
