"""Enforcement modes and visibility levels: a profile's, and a workload's own.

A workload's mode in effect is its own (`workload set-mode`) when set, else its
profile's; its visibility level is its profile's. Each change is one store
write with its audit row; the compiler puts what is in effect into the
workload's policy, so only the hosts of the workloads that changed get a new
version (and are woken).
"""

from __future__ import annotations

import msgspec

from segd import log, wire
from segd.errors import NotFound
from segd.server.core import Core

_log = log.get("segd.server.modes")


class Modes:
    def __init__(self, core: Core) -> None:
        self._core = core

    async def set_profile_mode(self, name: str, body: wire.ProfileModeIn) -> wire.Profile:
        now = self._core.clock()
        async with self._core.store.write() as tx:
            prof = tx.profile_by_name(name)
            if prof is None:
                raise NotFound(f"no profile {name!r}")
            vis = (
                prof.visibility
                if isinstance(body.visibility, msgspec.UnsetType)
                else body.visibility
            )
            changed = tx.set_profile_mode(prof.id, body.mode, vis)
            tx.audit(
                now,
                "profile.mode_set",
                "ok",
                detail=f"{name}: mode {body.mode}, visibility {vis}, {len(changed)} workloads",
            )
        _log.info(
            "profile.mode_set", profile=name, mode=body.mode, visibility=vis, workloads=len(changed)
        )
        return msgspec.structs.replace(prof, mode=body.mode, visibility=vis)

    async def set_workload_mode(self, workload_id: str, body: wire.WorkloadModeIn) -> wire.Workload:
        now = self._core.clock()
        async with self._core.store.write() as tx:
            w = tx.workload(workload_id)
            if w is None:
                raise NotFound(f"no workload {workload_id!r}")
            found = tx.key_with_profile(w.key_id)
            inherited: wire.Mode = found[1].mode if found else "full"
            w = msgspec.structs.replace(w, mode=body.mode or inherited, mode_override=body.mode)
            tx.set_workload_mode(w)
            tx.audit(
                now,
                "workload.mode_set",
                "ok",
                host_id=w.host_id,
                container_id=w.container_id,
                workload_id=w.id,
                detail=f"mode {w.mode}" + ("" if body.mode else " (the profile's)"),
            )
        _log.info("workload.mode_set", workload=w.id, mode=w.mode, own=body.mode)
        return w
