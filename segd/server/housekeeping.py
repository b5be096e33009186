"""The server's background chores: refusal summaries, audit and flow retention.

`run(svc)` writes the summaries of refused requests whose window has ended
(every `TICK_S`) and deletes audit entries older than `audit_retention_days`
(at start, then every `PRUNE_EVERY_S`), when it also sums and deletes old flows
(`Flows.housekeep`, `[server.flows]`). Pruning goes in batches of
`PRUNE_BATCH` rows, each one writer of the group-committed store, so the
writers that arrive meanwhile go on between batches instead of waiting for the
whole backlog. A failing chore is logged and tried again on the next round.
"""

from __future__ import annotations

import asyncio
import time

from segd import log
from segd.errors import SegdError
from segd.server.service import Service

_log = log.get("segd.server.housekeeping")

TICK_S = 5.0
PRUNE_EVERY_S = 3600.0
PRUNE_BATCH = 500
DAY_S = 86400.0


async def run(svc: Service) -> None:
    """Until cancelled."""
    next_prune = 0.0
    while True:
        try:
            await svc.guard.flush(svc.store, svc.clock())
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_EVERY_S
                await prune_audit(svc)
                await svc.flows.housekeep()
        except SegdError as e:
            _log.warning("housekeeping.failed", error=e.message)
        except Exception:  # a bug in one round must not end the chores for good
            _log.exception("housekeeping.crashed")
        await asyncio.sleep(TICK_S)


async def prune_audit(svc: Service) -> int:
    """Delete the audit entries past retention, batch by batch; return how many."""
    days = svc.cfg.audit_retention_days
    if days == 0:
        return 0
    now = svc.clock()
    cutoff = now - days * DAY_S
    total = 0
    while True:
        async with svc.store.write() as tx:
            n = tx.prune_audit(cutoff, PRUNE_BATCH)
            total += n
            if n < PRUNE_BATCH and total:
                tx.audit(now, "audit.pruned", "ok", detail=f"{total} entries older than {days} d")
        if n < PRUNE_BATCH:
            break
        await asyncio.sleep(0)  # let the writers waiting meanwhile in first
    if total:
        _log.info("audit.pruned", entries=total, retention_days=days)
    return total
