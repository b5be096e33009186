"""The server's disk fills up mid-operation: pairings and admin changes get a clear
503 while reads and instruction fetches go on; nothing is half-written; once space
returns, the same server (no restart) pairs again, retries included."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.faults.check import (
    check_convergence,
    check_storm,
    fetch_instructions,
    highest_versions,
    read_store,
    server_verify_key,
)
from tests.faults.conftest import MakeServer
from tests.faults.load import AdminClient, PairAttempt, issue_keys, pair_storm, register_agents

WEB_TO_WEB = {
    "providers": [{"role": "web"}],
    "consumers": [{"role": "web"}],
    "services": ["tcp/80"],
}
TMPFS_SIZE = "8m"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs of its own (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(fs: Path) -> Path:
    """Write zeros until the file system is full, to the last byte; return the file."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


async def test_full_disk_answers_503_writes_nothing_and_recovers_without_restart(
    make_server: MakeServer, small_fs: Path
) -> None:
    server = make_server(small_fs / "data")
    server.start()
    async with aiohttp.ClientSession() as session:
        admin = AdminClient(server.url, server.token, session)
        await admin.call("POST", "/v1/rules", WEB_TO_WEB)
        agents = await register_agents(server.url, admin, 4)
        tokens = await issue_keys(admin, "web", {"role": "web"}, keys=2, max_uses=1000)
        vk = server_verify_key(server.data_dir)

        before = await pair_storm(server.url, agents, 40, 8, tokens=tokens, read_versions=True)
        assert {a.status for a in before.attempts} == {200}
        view_before = await read_store(admin)

        filler = fill(small_fs)
        during = await pair_storm(server.url, agents, 40, 8, tokens=tokens, first_index=40)
        assert {(a.status, a.error) for a in during.attempts} == {(503, "unavailable")}
        with pytest.raises(RuntimeError, match="503"):
            await admin.call("POST", "/v1/rules", WEB_TO_WEB)
        # Reads and instruction fetches do not need the disk.
        assert await read_store(admin) == view_before
        for a in agents:
            await fetch_instructions(session, server.url, a, vk)

        filler.unlink()  # space returns; the same process carries on
        retried = await pair_storm(
            server.url, agents, 40, 8, tokens=tokens, first_index=40, read_versions=True
        )
        assert {a.status for a in retried.attempts} == {200}
        after = await pair_storm(
            server.url, agents, 40, 8, tokens=tokens, first_index=80, read_versions=True
        )
        assert {a.status for a in after.attempts} == {200}
        await admin.call("POST", "/v1/rules", WEB_TO_WEB)

        attempts: list[PairAttempt] = before.attempts + retried.attempts + after.attempts
        view = await read_store(admin)
        check_storm(view, attempts)
        assert len(view.workloads) == 120
        assert not [e for e in view.audit if e.result not in ("ok", "reported")]
        await check_convergence(session, server.url, agents, view, vk, highest_versions(attempts))
    assert server.terminate() == 0
    assert "database or disk is full" in server.log_tail(1_000_000)
    _check_integrity(server.data_dir / "segd.db")


@pytest.mark.slow
async def test_disk_fills_and_frees_during_a_pairing_storm(
    make_server: MakeServer, small_fs: Path
) -> None:
    server = make_server(small_fs / "data")
    server.start()
    async with aiohttp.ClientSession() as session:
        admin = AdminClient(server.url, server.token, session)
        await admin.call("POST", "/v1/rules", WEB_TO_WEB)
        agents = await register_agents(server.url, admin, 8)
        tokens = await issue_keys(admin, "web", {"role": "web"}, keys=20, max_uses=100)
        vk = server_verify_key(server.data_dir)
        answered = 0
        filler: Path | None = None

        def on_attempt(a: PairAttempt) -> None:
            nonlocal answered, filler
            answered += 1
            if answered == 300:
                filler = fill(small_fs)
            elif answered == 900 and filler is not None:
                filler.unlink()

        storm = await pair_storm(
            server.url, agents, 1500, 16, tokens=tokens, read_versions=True, on_attempt=on_attempt
        )
        statuses = {a.status for a in storm.attempts}
        assert statuses == {200, 503}, statuses
        view = await read_store(admin)
        check_storm(view, storm.attempts)
        # Agents retry what got a 503; it pairs now, and the keys end up used exactly.
        failed = sorted(a.index for a in storm.attempts if a.status == 503)
        retries = [
            await pair_storm(server.url, agents, 1, 1, tokens=tokens, first_index=i)
            for i in failed[:200]
        ]
        assert all(r.attempts[0].status == 200 for r in retries)
        view = await read_store(admin)
        done = [a for a in storm.attempts if a.status != 503]
        check_storm(view, done + [r.attempts[0] for r in retries])
        await check_convergence(
            session, server.url, agents, view, vk, highest_versions(storm.attempts)
        )
    assert server.terminate() == 0
    _check_integrity(server.data_dir / "segd.db")


def _check_integrity(path: Path) -> None:
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
