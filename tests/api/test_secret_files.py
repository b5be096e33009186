"""Secret files (the server's signing key, agent keys, admin tokens): never
written through a planted link or into a file that exists, durable once made,
and the server's key made only by the server that holds the data dir."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from segd import crypto, files, sqlite
from segd.config import ADMIN_TOKEN_FILE, ServerConfig
from segd.errors import Conflict
from segd.server.service import DB_FILE, SIGNING_KEY_FILE, Service


async def test_the_signing_key_is_not_made_while_another_server_holds_the_data_dir(
    tmp_path: Path,
) -> None:
    data = tmp_path / "server"
    data.mkdir(mode=0o700)
    lock = sqlite.lock_data_dir(data / DB_FILE, "server")  # the server already running
    try:
        with pytest.raises(Conflict):
            await Service.open(ServerConfig(data_dir=str(data)))
    finally:
        os.close(lock)
    assert not (data / SIGNING_KEY_FILE).exists()


@pytest.mark.parametrize("name", [SIGNING_KEY_FILE, ADMIN_TOKEN_FILE])
async def test_a_secret_is_never_written_through_a_planted_link(tmp_path: Path, name: str) -> None:
    data = tmp_path / "server"
    data.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere"
    (data / f"{name}.tmp").symlink_to(elsewhere)  # where the secret used to be staged
    svc = await Service.open(ServerConfig(data_dir=str(data)))
    await svc.close()
    assert not elsewhere.exists()
    written = data / name
    assert stat.S_ISREG(written.lstat().st_mode) and stat.S_IMODE(written.stat().st_mode) == 0o600


async def test_a_signing_key_that_is_a_link_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "server"
    data.mkdir(mode=0o700)
    real = tmp_path / "real.key"
    real.write_bytes(b"k" * 32)
    (data / SIGNING_KEY_FILE).symlink_to(real)
    with pytest.raises(Exception, match="signing key"):
        await Service.open(ServerConfig(data_dir=str(data)))


def test_an_existing_key_is_loaded_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    first = crypto.load_or_create_signing_key(path)
    assert files.create_file(path, b"x" * 32) is False
    assert bytes(crypto.load_or_create_signing_key(path)) == bytes(first)
    assert [p.name for p in tmp_path.iterdir()] == ["agent.key"]  # no temporary left


@pytest.mark.parametrize("how", ["create", "replace"])
def test_a_new_secret_is_durable_once_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The file is fsynced, then linked or renamed, then its directory fsynced: a
    power cut after that cannot take back the name (and with it the key)."""
    events: list[str] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(*a: Any, **kw: Any) -> None:
        events.append("rename")
        real_replace(*a, **kw)

    def link(*a: Any, **kw: Any) -> None:
        events.append("rename")
        real_link(*a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    if how == "create":
        crypto.load_or_create_signing_key(tmp_path / "server.key")
    else:
        files.write_secret(tmp_path / "admin.token", "segd_x\n")
    assert events == ["fsync file", "rename", "fsync dir"]
