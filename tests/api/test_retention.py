"""Audit retention: entries past `audit_retention_days` are deleted in batches, in
the background; the audit stays append-only for everything else."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from segd.config import ServerConfig
from segd.server import housekeeping
from segd.server.service import Service
from tests.api.conftest import Admin, AiohttpClient, Clock, start_admin

DAY = 86400.0
RULE = {"providers": [{"role": "db"}], "consumers": [{"role": "web"}], "services": ["tcp/5432"]}


async def _fill(svc: Service, n: int, at: float) -> None:
    async with svc.store.write() as tx:
        for i in range(n):
            tx.audit(at, "test.filler", "ok", detail=str(i))


async def test_the_audit_past_retention_is_pruned_and_the_rest_kept(
    api: Admin, clock: Clock
) -> None:
    """The audit used to grow for ever: nothing could delete from it."""
    svc = api.svc
    assert svc.cfg.audit_retention_days == 90
    n_old = 3 * housekeeping.PRUNE_BATCH + 7
    await _fill(svc, n_old, clock() - 91 * DAY)
    await _fill(svc, 5, clock() - 89 * DAY)
    kept = await svc.store.audit_count() - n_old
    assert await housekeeping.prune_audit(svc) == n_old
    entries = await api.ok("GET", "/v1/audit?limit=1000")
    assert len(entries) == kept + 1
    assert all(e["at"] >= clock() - 90 * DAY for e in entries)
    assert entries[-1]["event"] == "audit.pruned"
    assert f"{n_old} entries older than 90 d" in entries[-1]["detail"]
    assert await housekeeping.prune_audit(svc) == 0


async def test_retention_zero_keeps_every_entry(
    aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    cfg = ServerConfig(data_dir=server_cfg.data_dir, audit_retention_days=0)
    api = await start_admin(aiohttp_client, cfg, clock)
    await _fill(api.svc, 10, clock() - 10_000 * DAY)
    assert await housekeeping.prune_audit(api.svc) == 0
    assert await api.svc.store.audit_count() == 10


async def test_the_audit_stays_append_only_within_retention(
    api: Admin, clock: Clock, server_cfg: ServerConfig
) -> None:
    await _fill(api.svc, 3, clock() - 91 * DAY)
    await _fill(api.svc, 3, clock())
    await housekeeping.prune_audit(api.svc)
    db = sqlite3.connect(Path(server_cfg.data_dir) / "segd.db")
    try:
        for sql in ("DELETE FROM audit", "UPDATE audit SET detail = 'x'"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                db.execute(sql)
    finally:
        db.close()
    assert await api.svc.store.audit_count() == 3 + 1


async def test_writers_go_on_between_prune_batches(api: Admin, clock: Clock) -> None:
    await _fill(api.svc, 20 * housekeeping.PRUNE_BATCH, clock() - 91 * DAY)
    pruning = asyncio.create_task(housekeeping.prune_audit(api.svc))
    await asyncio.sleep(0)  # the first batch is under way
    await api.ok("POST", "/v1/rules", RULE, status=201)
    assert not pruning.done()  # the rule did not wait for the whole backlog
    assert await pruning == 20 * housekeeping.PRUNE_BATCH


async def test_the_server_prunes_in_the_background_from_its_start(
    api: Admin, aiohttp_client: AiohttpClient, server_cfg: ServerConfig, clock: Clock
) -> None:
    await _fill(api.svc, 50, clock() - 91 * DAY)
    await api.client.close()
    api2 = await start_admin(aiohttp_client, server_cfg, clock)
    for _ in range(500):  # the housekeeping task's first round runs at start
        if await api2.svc.store.audit_count() <= 1:
            break
        await asyncio.sleep(0.01)
    [entry] = await api2.ok("GET", "/v1/audit")
    assert entry["event"] == "audit.pruned"
