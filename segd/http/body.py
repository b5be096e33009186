"""Request bodies: read within the size limit, decoded as segd decodes them.

aiohttp leaves a body encoded (the listener sets `ENCODED_BODY`): segd decodes
gzip and deflate itself so that the size limit applies to the decoded body. A
body beyond the limit is `body_too_large` (413); one cut short, badly chunked
or not what its Content-Encoding says is `bad_body` (400).
"""

from __future__ import annotations

import zlib

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from segd.errors import SegdError

# A body cut short (or its connection closed by the listener's body timeout),
# badly chunked, or not what its Content-Encoding says.
BODY_ERRORS = (web.RequestPayloadError, HttpProcessingError, zlib.error, ConnectionError)

# Set by segd's listener on every request: aiohttp leaves its body encoded, segd decodes it.
ENCODED_BODY = web.RequestKey("segd_encoded_body", bool)


async def read_body(request: web.Request, limit: int | None = None) -> bytes:
    """The body, decoded, refused (413) beyond `limit` (the app's size limit by
    default) after decoding."""
    if limit is None:
        limit = request.client_max_size
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
    except BODY_ERRORS:
        raise bad_body(request) from None
    return decoded(request, b"".join(chunks), limit)


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
