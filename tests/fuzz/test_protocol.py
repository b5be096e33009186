"""HTTP below the client libraries: raw bytes on a socket to the in-process
server, through segd's listener. Framing errors (a Content-Length that lies,
bad chunking, non-ASCII request lines, oversized headers) are aiohttp's parser
to detect and the listener's to answer: a JSON 4xx and a closed connection;
whatever reaches segd (undecodable header bytes, compressed bodies, odd
methods) gets a JSON 4xx too. Never a 5xx, never a plain-text answer, never a
hang, and the server answers normally afterwards.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from segd import crypto
from tests.api.conftest import Admin, AiohttpClient, MakeAgent
from tests.fuzz import strategies as fz
from tests.fuzz.harness import Env, check_error, state

READ_TIMEOUT_S = 10.0


async def exchange_raw(api: Admin, data: bytes, *, half_close: bool = False) -> bytes:
    """Write `data`, read until the server closes (or READ_TIMEOUT_S: a hang)."""
    srv = api.client.server
    reader, writer = await asyncio.open_connection(srv.host, srv.port)
    try:
        writer.write(data)
        await writer.drain()
        if half_close:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), READ_TIMEOUT_S)
    finally:
        writer.close()
        await writer.wait_closed()


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ")[1])
    headers = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def request(
    method: str, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> bytes:
    lines = [method.encode() + b" " + path + b" HTTP/1.1", b"Host: segd", b"Connection: close"]
    lines += [k + b": " + v for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def admin(api: Admin) -> tuple[bytes, bytes]:
    return b"Authorization", f"Bearer {api.token}".encode()


def assert_app_error(raw: bytes, status: int | None = None) -> dict[str, str]:
    """An answer from segd itself: a JSON {error, message} 4xx."""
    got, headers, body = parse(raw)
    assert got < 500, raw[:300]
    assert headers.get("content-type", "").startswith("application/json"), raw[:300]
    answer = check_error(got, body)
    if status is not None:
        assert got == status, raw[:300]
    return answer


def assert_refused_framing(raw: bytes) -> None:
    """The listener's refusal of a message aiohttp cannot parse: a JSON 4xx (or a
    plain close when nothing was sent that could be answered)."""
    if raw:
        assert_app_error(raw)


async def assert_healthy(api: Admin) -> None:
    assert (await api.call("GET", "/v1/health"))[0] == 200


# ---- what reaches segd ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"Bearer \xff\xfe", b"Bearer \xc3\xa9t\xc3\xa9", b"Bearer segd_\x80", b"\xff", b"Bearer \xa0"],
)
async def test_undecodable_admin_token_bytes_are_a_401(api: Admin, value: bytes) -> None:
    raw = await exchange_raw(api, request("GET", b"/v1/rules", [(b"Authorization", value)]))
    assert assert_app_error(raw, 401)["error"] == "unauthorized"


@pytest.mark.parametrize(
    "header", [b"X-Segd-Host", b"X-Segd-Timestamp", b"X-Segd-Nonce", b"X-Segd-Signature"]
)
async def test_undecodable_signature_header_bytes_are_a_401(
    api: Admin, make_agent: MakeAgent, header: bytes
) -> None:
    a = await make_agent()
    signed = a.sign("GET", "/v1/agent/instructions")
    headers = [
        (k.encode(), b"\xff\xfe" + v.encode() if k.encode() == header else v.encode())
        for k, v in signed.items()
    ]
    raw = await exchange_raw(api, request("GET", b"/v1/agent/instructions", headers))
    assert_app_error(raw, 401)


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/x%0Ay",
        b"/v1/x%00y",
        b"/v1/%FF",
        b"/v1/%ED%A0%80",
        b"/v1/rules/%0D%0A%20x",
        b"/v1/%E2%80%A8",
    ],
)
async def test_decoded_paths_are_echoed_on_one_line(api: Admin, path: bytes) -> None:
    raw = await exchange_raw(api, request("DELETE", path, [admin(api)]))
    assert_app_error(raw, 404)


async def test_a_gzip_bomb_is_refused_by_size(api: Admin) -> None:
    """50 MB of zeros in 49 kB: refused by the decompressed size, quickly."""
    bomb = gzip.compress(b'{"description": "' + b"0" * 50_000_000 + b'"}')
    headers = [
        admin(api),
        (b"Content-Encoding", b"gzip"),
        (b"Content-Length", str(len(bomb)).encode()),
    ]
    before = await state(api)
    raw = await exchange_raw(api, request("POST", b"/v1/rules", headers, bomb))
    got = parse(raw)[0]
    assert got in (400, 413), raw[:300]
    assert await state(api) == before
    await assert_healthy(api)


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate", b"br", b"x-nonsense"])
async def test_a_corrupt_compressed_body_is_a_4xx(api: Admin, encoding: bytes) -> None:
    body = b"\x1f\x8b\x08\x00garbage" if encoding == b"gzip" else b"not compressed at all"
    headers = [
        admin(api),
        (b"Content-Encoding", encoding),
        (b"Content-Length", str(len(body)).encode()),
    ]
    raw = await exchange_raw(api, request("POST", b"/v1/rules", headers, body))
    got = parse(raw)[0] if raw else 400
    assert 400 <= got < 500, raw[:300]
    await assert_healthy(api)


@pytest.mark.parametrize(
    ("method", "encoding"),
    [("POST", b"br"), ("POST", b"zstd"), ("POST", b"x-nonsense"), ("POST", b"gzip, br"),
     ("POST", b"compress"), ("GET", b"br")],
)  # fmt: skip
async def test_an_unsupported_content_encoding_is_a_json_415(
    api: Admin, method: str, encoding: bytes
) -> None:
    """Whatever decoders happen to be installed: segd takes gzip, deflate or none."""
    body = b"" if method == "GET" else b'{"providers": "any"}'
    headers = [
        admin(api),
        (b"Content-Encoding", encoding),
        (b"Content-Length", str(len(body)).encode()),
    ]
    before = await state(api)
    raw = await exchange_raw(api, request(method, b"/v1/rules", headers, body))
    assert assert_app_error(raw, 415)["error"] == "unsupported_media_type"
    assert await state(api) == before
    await assert_healthy(api)


async def test_a_compressed_valid_body_is_taken(api: Admin) -> None:
    rule = {"providers": "any", "consumers": "any", "services": ["tcp/80"]}
    body = zlib.compress(json.dumps(rule).encode())
    headers = [
        admin(api),
        (b"Content-Encoding", b"deflate"),
        (b"Content-Length", str(len(body)).encode()),
    ]
    raw = await exchange_raw(api, request("POST", b"/v1/rules", headers, body))
    assert parse(raw)[0] == 201, raw[:300]


# ---- what aiohttp refuses before segd sees it -------------------------------------------


P = b"POST /v1/rules HTTP/1.1\r\nHost: s\r\n"
G = b"GET /v1/health HTTP/1.1\r\nHost: s\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
FRAMING = [
    ("content-length larger than the body, then EOF", P + b"Content-Length: 100\r\n\r\n{}", True),
    ("content-length smaller than the body",
     P + b"Content-Length: 2\r\n\r\n{}garbage-that-is-not-http\r\n\r\n", False),
    ("two content-lengths", P + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}x", False),
    ("negative content-length", P + b"Content-Length: -1\r\n\r\n", False),
    ("content-length not a number", P + b"Content-Length: 1e3\r\n\r\n", False),
    ("chunked and content-length",
     P + b"Content-Length: 2\r\n" + CHUNKED + b"\r\n2\r\n{}\r\n0\r\n\r\n", False),
    ("bad chunk size", P + CHUNKED + b"\r\nzz\r\n{}\r\n0\r\n\r\n", False),
    ("chunk larger than sent, then EOF", P + CHUNKED + b"\r\nffff\r\n{}", True),
    ("unknown transfer encoding", P + b"Transfer-Encoding: gzip, zz\r\n\r\n", False),
    ("non-ASCII request line", "GET /v1/é HTTP/1.1\r\nHost: s\r\n\r\n".encode(), False),
    ("space in the path", b"GET /v1/a b HTTP/1.1\r\nHost: s\r\n\r\n", False),
    ("unknown method token", b"FOO /v1/rules HTTP/1.1\r\nHost: s\r\n\r\n", False),
    ("lowercase method", b"get /v1/rules HTTP/1.1\r\nHost: s\r\n\r\n", False),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", False),
    ("HTTP/9.9", b"GET /v1/health HTTP/9.9\r\nHost: s\r\n\r\n", False),
    ("header without colon", G + b"broken\r\n\r\n", False),
    ("header line too long", G + b"X-A: " + b"a" * 20_000 + b"\r\n\r\n", False),
    ("ten thousand headers", G + b"X-A: b\r\n" * 10_000 + b"\r\n", False),
    ("NUL in a header", G + b"X-A: a\x00b\r\n\r\n", False),
    ("bare LF line ends", b"GET /v1/health HTTP/1.1\nHost: s\n\n", False),
    ("obsolete line folding", G + b"X-A: a\r\n b\r\n\r\n", False),
    ("just garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", True),
    ("empty", b"", True),
]  # fmt: skip


@pytest.mark.parametrize(("name", "data", "half_close"), FRAMING, ids=[f[0] for f in FRAMING])
async def test_broken_framing_is_refused_without_a_5xx_or_a_hang(
    api: Admin, name: str, data: bytes, half_close: bool
) -> None:
    before = await state(api)
    raw = await exchange_raw(api, data, half_close=half_close)
    assert_refused_framing(raw)
    assert await state(api) == before
    await assert_healthy(api)


@fz.fast(40)
@given(data=st.one_of(st.binary(max_size=300), st.sampled_from([f[1] for f in FRAMING])))
async def test_random_bytes_on_the_socket(env: Env, data: bytes) -> None:
    """Then EOF: whatever was sent, the server answers or closes at once."""
    raw = await exchange_raw(env.api, data, half_close=True)
    if raw.startswith(b"HTTP/") and parse(raw)[0] >= 400:
        assert_app_error(raw)
    elif raw.startswith(b"HTTP/"):
        assert parse(raw)[0] < 400, raw[:300]
    await assert_healthy(env.api)


@fz.fast(40)
@given(
    method=st.sampled_from(["GET", "POST", "DELETE"]),
    path=st.sampled_from([b"/v1/rules", b"/v1/agent/pair", b"/v1/profiles/x", b"/v1/health"]),
    header=st.binary(min_size=1, max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b),
    value=st.binary(max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b),
)
async def test_random_header_bytes(
    env: Env, method: str, path: bytes, header: bytes, value: bytes
) -> None:
    """Header names and values of any bytes: a success, or a JSON 4xx (the parser's
    refusal included)."""
    raw = await exchange_raw(env.api, request(method, path, [admin(env.api), (header, value)]))
    if parse(raw)[0] >= 400:
        assert_app_error(raw)


# ---- regressions pinned by fuzzing ------------------------------------------------------


async def test_an_unknown_expectation_is_a_json_417(api: Admin) -> None:
    raw = await exchange_raw(api, request("GET", b"/v1/rules", [admin(api), (b"Expect", b"magic")]))
    assert assert_app_error(raw, 417)["error"] == "expectation_failed"


async def test_expect_100_continue_is_honoured(api: Admin) -> None:
    body = json.dumps({"providers": "any", "consumers": "any", "services": ["tcp/80"]}).encode()
    headers = [
        admin(api),
        (b"Expect", b"100-continue"),
        (b"Content-Length", str(len(body)).encode()),
    ]
    raw = await exchange_raw(api, request("POST", b"/v1/rules", headers, body))
    assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), raw[:100]
    assert parse(raw[len(b"HTTP/1.1 100 Continue\r\n\r\n") :])[0] == 201


async def test_unknown_query_parameters_are_refused(api: Admin) -> None:
    status, body = await api.call("GET", "/v1/audit?limt=5")
    assert (status, body["error"]) == (400, "invalid_input")


async def test_a_claimed_key_id_with_a_newline_is_not_audited(
    api: Admin, make_agent: MakeAgent
) -> None:
    token = await api.setup_policy()
    _, claims_b64, sig = token.split(".")
    claims = json.loads(crypto.b64d(claims_b64))
    claims["kid"] += "\n"
    forged = f"segd1.{crypto.b64e(json.dumps(claims).encode())}.{sig}"
    a = await make_agent()
    status, body = await a.pair("c1", forged, ["10.0.0.1"])
    assert (status, body["error"]) == (403, "bad_signature")
    [entry] = await api.ok("GET", "/v1/audit?limit=1")
    assert "\n" not in entry["key_id"], entry


async def test_the_proposed_expect_handler_answers_json(aiohttp_client: AiohttpClient) -> None:
    """The expect handler add_routes uses, on a one-route app: JSON 417s, and
    100-continue still honoured."""
    from aiohttp import web

    from segd.http.errors import expect_handler, middleware

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"body": (await request.read()).decode()})

    app = web.Application(middlewares=[middleware])
    app.router.add_route("POST", "/x", ok, expect_handler=expect_handler)
    client = await aiohttp_client(app)
    srv = client.server
    for expect, want in ((b"magic", b"417"), (b"100-continue", b"100")):
        reader, writer = await asyncio.open_connection(srv.host, srv.port)
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: s\r\nConnection: close\r\nContent-Length: 2\r\nExpect: "
            + expect
            + b"\r\n\r\n{}"
        )
        raw = await asyncio.wait_for(reader.read(), READ_TIMEOUT_S)
        writer.close()
        assert raw.startswith(b"HTTP/1.1 " + want), raw[:200]
        if want == b"417":
            assert check_error(417, parse(raw)[2])["error"] == "expectation_failed"
        else:
            assert b"HTTP/1.1 200" in raw and b'{"body": "{}"}' in raw, raw
