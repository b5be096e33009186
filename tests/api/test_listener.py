"""The server's listener (segd.http.listener) in process, with short limits: silent,
dripping and idle connections are closed on time, requests in progress are not,
and beyond `max_open` the longest idle connection makes room or a newcomer is
refused with a JSON 503."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from segd.config import ConnectionLimits, ServerConfig
from tests.api.conftest import Admin, MakeAgent

LIMITS = ConnectionLimits(max_open=16, idle_timeout_s=1.5, header_timeout_s=0.5, body_timeout_s=1.0)
ENOUGH_S = 10.0  # far beyond every limit above: not closed by then means never


@pytest.fixture
def server_cfg(tmp_path: Path) -> ServerConfig:
    return ServerConfig(
        data_dir=str(tmp_path / "server"), longpoll_timeout_s=5.0, connections=LIMITS
    )


async def _open(api: Admin) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    srv = api.client.server
    return await asyncio.open_connection(srv.host, srv.port)


async def _closed_after(reader: asyncio.StreamReader, at_most: float = ENOUGH_S) -> float:
    """Seconds until the server closes the connection (whatever it answered first)."""
    t0 = time.monotonic()
    while await asyncio.wait_for(reader.read(65536), at_most):
        pass
    return time.monotonic() - t0


async def _still_open(reader: asyncio.StreamReader, for_s: float) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1), for_s)
    except TimeoutError:
        return True
    return bool(data)


async def test_a_connection_that_never_sends_a_byte_is_closed_after_the_header_timeout(
    api: Admin,
) -> None:
    reader, writer = await _open(api)
    assert await _closed_after(reader) < ENOUGH_S
    writer.close()


async def test_a_header_sent_one_line_at_a_time_is_cut_at_the_header_timeout(api: Admin) -> None:
    reader, writer = await _open(api)
    writer.write(b"GET /v1/health HTTP/1.1\r\nHost: segd\r\n")

    async def drip() -> None:
        for i in range(100):  # 20 s of headers, well below aiohttp's own 128-header limit
            writer.write(b"X-Drip-%d: x\r\n" % i)
            await asyncio.sleep(0.2)

    dripping = asyncio.create_task(drip())
    try:
        assert await _closed_after(reader) < ENOUGH_S
        assert not dripping.done()  # cut by the timeout, not by running out of lines
    finally:
        dripping.cancel()
        writer.close()


async def test_an_idle_keepalive_connection_is_closed_after_the_idle_timeout(api: Admin) -> None:
    reader, writer = await _open(api)
    writer.write(b"GET /v1/health HTTP/1.1\r\nHost: segd\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ENOUGH_S)
    assert head.startswith(b"HTTP/1.1 200")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    # Past the header timeout, the connection waits for its next request ...
    assert await _still_open(reader, LIMITS.header_timeout_s + 0.3)
    # ... until the idle timeout.
    assert await _closed_after(reader) < ENOUGH_S
    writer.close()


async def test_a_long_poll_outlives_the_idle_and_header_timeouts(
    api: Admin, make_agent: MakeAgent
) -> None:
    agent = await make_agent()
    status, signed = await agent.instructions()
    assert status == 200
    version = agent.open(signed).version
    wait = 3 * LIMITS.idle_timeout_s
    t0 = time.monotonic()
    status, _ = await agent.instructions(since=version, wait=wait)
    assert status == 204  # nothing newer: answered when the wait ran out, not cut
    assert time.monotonic() - t0 >= wait - 0.1


async def test_a_body_sent_too_slowly_is_cut_and_writes_nothing(api: Admin) -> None:
    before = await api.snapshot()
    reader, writer = await _open(api)
    writer.write(
        b"POST /v1/profiles HTTP/1.1\r\nHost: segd\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + api.token.encode() + b"\r\nContent-Length: 100\r\n\r\n{"
    )
    assert await _closed_after(reader) < ENOUGH_S
    writer.close()
    assert await api.snapshot() == before


async def test_beyond_max_open_the_longest_idle_connection_makes_room(api: Admin) -> None:
    held = [await _open(api) for _ in range(LIMITS.max_open)]
    first_reader = held[0][0]
    status, _ = await api.call("GET", "/v1/rules")
    assert status == 200
    assert await _closed_after(first_reader, LIMITS.header_timeout_s) < LIMITS.header_timeout_s
    for _, w in held:
        w.close()


async def test_when_every_connection_is_serving_a_request_a_newcomer_gets_a_json_503(
    api: Admin, make_agent: MakeAgent
) -> None:
    agent = await make_agent()
    version = agent.open((await agent.instructions())[1]).version
    polls = [
        asyncio.create_task(agent.instructions(since=version, wait=4.0))
        for _ in range(LIMITS.max_open)
    ]
    await asyncio.sleep(1.0)  # every slot holds a long-poll (idle ones made room)
    reader, writer = await _open(api)
    raw = await asyncio.wait_for(reader.read(), ENOUGH_S)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), raw
    assert json.loads(body)["error"] == "busy"
    # Long-polls in progress were never cut to make room.
    assert {status for status, _ in await asyncio.gather(*polls)} == {204}
    assert (await api.call("GET", "/v1/rules"))[0] == 200
