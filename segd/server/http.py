"""HTTP plumbing shared by the API: error middleware, bodies, query parameters.

Every error leaves as `{"error": CODE, "message": TEXT}` (wire.Error): segd
errors with their own status, undecodable or invalid JSON as 400, unknown
routes as 404, oversize bodies as 413. Anything unexpected is logged and
answered 500 without details. A message is always one line of printable
text: whatever of the request it echoes (a decoded path, a header) is escaped.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from typing import Any

import msgspec
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError

from segd import log, wire
from segd.errors import InvalidInput, SegdError

_log = log.get("segd.server.http")
_enc = msgspec.json.Encoder()

MAX_MESSAGE = 1000

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    417: "expectation_failed",
}


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


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except SegdError as e:
        return error_response(e.status, e.code, e.message)
    except msgspec.ValidationError as e:
        return error_response(400, "invalid_input", str(e))
    except msgspec.DecodeError as e:
        return error_response(400, "malformed_json", f"request body is not valid JSON: {e}")
    except UnicodeDecodeError as e:
        # msgspec raises this (not a DecodeError) for a string that is not UTF-8.
        return error_response(400, "malformed_json", f"request body is not valid UTF-8: {e}")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "http_error")
        if e.status == 404:
            msg = f"no such route: {request.method} {request.path}"
        elif e.status == 405:
            msg = f"method {request.method} is not allowed on {request.path}"
        elif e.status == 413:
            msg = f"request body is larger than {request.client_max_size} bytes"
        else:
            msg = e.reason
        return error_response(e.status, code, msg)
    except asyncio.CancelledError:
        raise
    except Exception:
        _log.exception("http.internal_error", method=request.method, path=request.path)
        return error_response(500, "internal_error", "internal server error (see server log)")


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


async def read_body(request: web.Request) -> bytes:
    """The body, decoded, refused (413) beyond the app's size limit (after decoding)."""
    limit = request.client_max_size
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    try:
        data = await request.read()
    except BODY_ERRORS:
        raise bad_body(request) from None
    return decoded(request, data, limit)


# A body cut short (or its connection closed by the listener's body timeout),
# badly chunked, or not what its Content-Encoding says.
BODY_ERRORS = (web.RequestPayloadError, HttpProcessingError, zlib.error, ConnectionError)

# Set by segd's listener on every request: aiohttp leaves its body encoded, segd decodes it.
ENCODED_BODY = web.RequestKey("segd_encoded_body", bool)


def decoded(request: web.BaseRequest, data: bytes, limit: int) -> bytes:
    """`data` as its Content-Encoding (gzip, deflate or none; the listener refused
    others) says, at most `limit` bytes of it, and all of it valid."""
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
    if not request.get(ENCODED_BODY) or encoding in ("", "identity"):
        return data
    # gzip; deflate as RFC 1950 says (zlib), or the raw deflate some clients send.
    for wbits in (16 + zlib.MAX_WBITS,) if encoding == "gzip" else (zlib.MAX_WBITS, -15):
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(data, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit:
            raise too_large(limit)
        if d.eof and not d.unused_data:
            return out
        break
    raise bad_body(request)


def too_large(limit: int) -> SegdError:
    message = f"request body is larger than {limit} bytes"
    return SegdError(message, code="body_too_large", status=413)


def bad_body(request: web.BaseRequest) -> SegdError:
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "")
    what = f"valid {encoding} data" if encoding else "a complete body"
    return SegdError(f"request body is not {what}", code="bad_body", status=400)


def int_param(request: web.Request, name: str, default: int | None, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise InvalidInput(f"query parameter {name!r} is required")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {name!r} must be an integer") from None
    if not low <= value <= high:
        raise InvalidInput(f"query parameter {name!r} must be between {low} and {high}")
    return value


def float_param(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    """A number, clamped to `high` (so an agent may ask for longer than the server allows)."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {name!r} must be a number") from None
    if math.isnan(value) or value < low:
        raise InvalidInput(f"query parameter {name!r} must be at least {low}")
    return min(value, high)
