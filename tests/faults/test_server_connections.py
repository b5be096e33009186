"""`segd server` as a process under a small open-files limit, held by one client:
2,000 idle and 200 header-dripping connections cannot keep an admin request,
an agent's long-poll or a pairing from answering within a second, the server
does not run out of files, and the held connections are closed by the timeouts."""

from __future__ import annotations

import time
from pathlib import Path

from tests.faults.listener import (
    Drip,
    busy_requests,
    hold_idle,
    raise_own_nofile,
    setup,
    wait_closed,
)
from tests.faults.proc import ServerProcess

IDLE, DRIP = 2000, 200
HEADER_TIMEOUT_S = 2.0
CONFIG = f"""
[server.connections]
idle_timeout_s = 2.0
header_timeout_s = {HEADER_TIMEOUT_S}
body_timeout_s = 2.0
"""


def _server(tmp_path: Path, **limits: int) -> ServerProcess:
    cfg = tmp_path / "segd.toml"
    cfg.write_text(CONFIG)
    return ServerProcess(tmp_path / "data", tmp_path / "server.log", config=cfg, **limits)


async def test_one_client_holding_thousands_of_connections_cannot_starve_the_server(
    tmp_path: Path,
) -> None:
    raise_own_nofile(IDLE + DRIP + 1000)
    server = _server(tmp_path, nofile=1024)  # soft and hard: the server cannot raise it
    server.start()
    try:
        admin, agent, key = await setup(server.url, server.token)
        host, port = "127.0.0.1", server.port
        held = await hold_idle(host, port, IDLE)
        dripping = Drip(host, port, every=0.5)
        await dripping.start(DRIP)
        try:
            assert len(held) == IDLE and len(dripping.conns) == DRIP  # all were accepted
            busy = await busy_requests(server.url, admin, agent, key, "c-busy", within=1.0)
            assert (busy.pair_status, busy.longpoll_status) == (200, 200), busy
            assert None not in (busy.admin_s, busy.pair_s, busy.longpoll_s), busy
            # Evicted to make room, or closed by the header timeout: none is kept.
            await wait_closed(held + dripping.conns, time.monotonic() + 15)
            assert all(c.closed is not None for c in held + dripping.conns)
        finally:
            dripping.stop()
            for c in held:
                c.close()
            await admin.session.close()
        assert server.popen is not None and server.popen.poll() is None
    finally:
        server.stop()
    log = server.log_tail(10**6)
    assert "Too many open files" not in log and "listener.at_limit" in log


async def test_idle_and_dripping_connections_are_closed_by_the_header_timeout(
    tmp_path: Path,
) -> None:
    """With files to spare nothing is evicted: each connection lives as long as
    the header timeout allows, not less, and not the hour aiohttp would allow."""
    raise_own_nofile(IDLE + DRIP + 1000)
    server = _server(tmp_path, nofile=8192)
    server.start()
    try:
        host, port = "127.0.0.1", server.port
        held = await hold_idle(host, port, IDLE)
        dripping = Drip(host, port, every=0.5)
        await dripping.start(DRIP)
        try:
            conns = held + dripping.conns
            await wait_closed(conns, time.monotonic() + HEADER_TIMEOUT_S + 10)
            lifetimes = [c.lifetime for c in conns]
            assert None not in lifetimes
            assert all(
                # The client notes a connect a little after the server's accept.
                HEADER_TIMEOUT_S / 2 <= t <= HEADER_TIMEOUT_S + 5
                for t in lifetimes
                if t is not None
            ), sorted(t for t in lifetimes if t is not None)[:: len(lifetimes) // 10]
        finally:
            dripping.stop()
            for c in held:
                c.close()
    finally:
        server.stop()


def test_the_server_raises_its_soft_open_files_limit_to_the_hard_one(tmp_path: Path) -> None:
    server = _server(tmp_path, nofile=512, nofile_hard=4096)
    server.start()
    try:
        limits = Path(f"/proc/{server.pid}/limits").read_text()
    finally:
        server.stop()
    [line] = [ln for ln in limits.splitlines() if ln.startswith("Max open files")]
    assert line.split()[3:5] == ["4096", "4096"], line
