"""The one task that changes the kernel.

Whenever it is kicked it runs a batch: it takes the containers the `Host` marked
dirty, asks `reconcile.step` what to do, runs each op through the executor and
folds the result back in, and asks again, until nothing is left. Containers
marked while a batch runs join it; when something happened during a step (a
newer version of the instructions) the rest of that step is planned again, so
versions that arrive while the kernel is busy are applied together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from segd import log
from segd.agent import reconcile
from segd.agent.executor import Executor
from segd.agent.host import Host, Report
from segd.agent.ops import (
    ApplyTable,
    Failed,
    Forget,
    GateChange,
    GateRebuild,
    GateSubnets,
    ListGate,
    ListTable,
    LookupPorts,
    Op,
    Result,
    container_of,
    containers_of,
)

_log = log.get(__name__)

MAX_STEPS = 10_000  # per batch: a safety stop (each step makes progress or ends the batch)


class Enforcer:
    def __init__(
        self,
        host: Host,
        executor: Executor,
        report: Callable[[Report], None],
        observe: Callable[[Op, Result, float], None] | None = None,
    ) -> None:
        self.host = host
        self._observe = observe
        self.executor = executor
        self._report = report
        self._kick = asyncio.Event()
        self._settled = asyncio.Condition()
        self.after_batch: Callable[[], None] = lambda: None  # the agent's look at the host
        self._started = 0  # batches begun
        self._finished = 0
        self._drift = False

    def kick(self) -> None:
        """Something changed: run a batch soon."""
        self._kick.set()

    async def converge(self) -> None:
        """Return once a batch that began after this call has finished."""
        target = self._started + 1
        self._kick.set()
        async with self._settled:
            await self._settled.wait_for(lambda: self._finished >= target)

    async def check_drift(self) -> None:
        """Compare every table the agent left (and the gate) with the kernel's;
        repair and report what changed."""
        self._drift = True
        await self.converge()

    async def run(self) -> None:
        """A batch whenever something changed, forever."""
        while True:
            await self._kick.wait()
            self._kick.clear()
            self._started += 1
            try:
                await self._batch()
            except Exception as e:  # the next event or reconcile tries again
                _log.error("enforce.batch_failed", error=repr(e))
            self.after_batch()
            self._finished = self._started
            async with self._settled:
                self._settled.notify_all()

    async def _batch(self) -> None:
        failed: set[str] = set()
        if self._drift:
            self._drift = False
            for op in reconcile.drift_checks(self.host):
                await self._exec(op, failed, {})
        batch: set[str] = set()
        touched: dict[str, float] = {}  # container -> when its first op began
        told: set[str] = set()  # invalid workloads logged in this batch
        for _ in range(MAX_STEPS):
            fresh = self.host.take_dirty()
            failed -= fresh  # news about a container: try it again
            batch |= fresh
            step = reconcile.step(self.host, batch, failed)
            batch -= step.idle
            for cid, why in step.invalid.items():
                if cid not in told:
                    told.add(cid)
                    _log.error("enforce.invalid_workload", container=cid[:12], error=why)
            if not step.ops:
                return
            revision = self.host.revision
            for i, op in enumerate(step.ops):
                if i and self.host.revision != revision:
                    break  # something happened meanwhile (a newer version): plan again
                await self._exec(op, failed, touched)
        _log.warning("enforce.batch_cut", containers=len(batch))
        self.host.dirty |= batch  # the next batch carries on
        self._kick.set()

    async def _exec(self, op: Op, failed: set[str], touched: dict[str, float]) -> None:
        t0 = time.perf_counter()
        res = await self.executor.run(op)
        if self._observe is not None:
            self._observe(op, res, time.perf_counter() - t0)
        for report in self.host.absorb(res, failed):
            self._report(report)
        if isinstance(res, Failed):
            _log_failure(res)
        for cid in containers_of(op):
            touched.setdefault(cid, t0)
            if reconcile.in_place(self.host, cid, failed):
                want = reconcile.desired(self.host, cid)
                _log.debug(
                    "enforce.done",
                    container=cid[:12],
                    kind=want.kind if want else "",
                    ms=round((time.perf_counter() - touched.pop(cid)) * 1000, 2),
                )


def _log_failure(res: Failed) -> None:
    cid = container_of(res.op)[:12]
    match res.op:
        case _ if res.gone:  # it died while we worked: not an error
            _log.info("enforce.container_gone", container=cid)
        case ApplyTable(refused="unknown"):
            _log.warning("enforce.delta_failed", container=cid, error=res.error)
        case ApplyTable():
            _log.error("enforce.failed", container=cid, error=res.error)
        case LookupPorts():
            _log.error("enforce.ports_failed", container=cid, error=res.error)
        case Forget():
            _log.warning("firewall.forget_failed", container=cid, error=res.error)
        case GateRebuild():
            _log.error("gate.rebuild_failed", error=res.error)
        case GateChange() | GateSubnets():
            _log.warning("tamper.gate", error=res.error)
        case ListTable() | ListGate():
            _log.warning("drift.check_failed", container=cid, error=res.error)
