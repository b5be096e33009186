"""The admin token: rotated on request, and never two valid at once after a start."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

from segd.config import ADMIN_TOKEN_FILE, ServerConfig
from segd.server.service import sha256_hex
from tests.api.conftest import Admin, AiohttpClient, Clock, start_admin


def _token_file(cfg: ServerConfig) -> Path:
    return Path(cfg.data_dir) / ADMIN_TOKEN_FILE


async def _events(api: Admin) -> list[tuple[str, str]]:
    return [(e["event"], e["reason"]) for e in await api.ok("GET", "/v1/audit")]


async def test_rotated_admin_token_is_refused(api: Admin, server_cfg: ServerConfig) -> None:
    old = api.token
    rotated = await api.ok("POST", "/v1/admin-token/rotate")
    new = rotated["token"]
    assert new != old and new.startswith("segd_")
    path = _token_file(server_cfg)
    assert rotated["token_file"] == str(path)
    assert path.read_text().strip() == new
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    status, body = await api.call("GET", "/v1/rules", token=old)
    assert (status, body["error"]) == (401, "unauthorized")
    assert (await api.call("GET", "/v1/rules", token=new))[0] == 200
    api.token = new
    assert ("admin.token_rotated", "") in await _events(api)


async def test_deleting_admin_token_and_restarting_leaves_one_valid_token(
    api: Admin, aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    """The start used to mint a second token and leave the old one working."""
    old = api.token
    await api.client.close()
    _token_file(server_cfg).unlink()
    api2 = await start_admin(aiohttp_client, server_cfg, clock)
    assert api2.token != old
    status, _ = await api2.call("GET", "/v1/rules", token=old)
    assert status == 401
    assert (await api2.call("GET", "/v1/rules"))[0] == 200
    assert ("admin.token_replaced", "file_missing") in await _events(api2)


async def test_a_token_file_that_holds_no_valid_token_is_replaced_at_start(
    api: Admin, aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    old = api.token
    await api.client.close()
    _token_file(server_cfg).write_text("segd_not-the-token\n")
    api2 = await start_admin(aiohttp_client, server_cfg, clock)
    assert api2.token not in (old, "segd_not-the-token")
    assert (await api2.call("GET", "/v1/rules", token=old))[0] == 401
    assert (await api2.call("GET", "/v1/rules", token="segd_not-the-token"))[0] == 401
    assert ("admin.token_replaced", "file_mismatch") in await _events(api2)


async def test_a_start_keeps_the_file_token_and_drops_any_other(
    api: Admin, aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    """A store left with two valid tokens (by the start of an older segd) keeps one."""
    await api.client.close()
    with sqlite3.connect(Path(server_cfg.data_dir) / "segd.db") as db:
        db.execute(
            "INSERT INTO admin_tokens (token_hash, created_at) VALUES (?, 0)",
            (sha256_hex("segd_second"),),
        )
    db.close()
    api2 = await start_admin(aiohttp_client, server_cfg, clock)
    assert api2.token == api.token
    assert (await api2.call("GET", "/v1/rules", token="segd_second"))[0] == 401
    assert (await api2.call("GET", "/v1/rules"))[0] == 200
    assert ("admin.tokens_invalidated", "") in await _events(api2)


async def test_a_restart_after_a_rotation_keeps_the_new_token(
    api: Admin, aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    new = (await api.ok("POST", "/v1/admin-token/rotate"))["token"]
    await api.client.close()
    api2 = await start_admin(aiohttp_client, server_cfg, clock)
    assert api2.token == new
    assert (await api2.call("GET", "/v1/rules"))[0] == 200
    assert ("admin.token_replaced", "file_missing") not in await _events(api2)
