"""Runs the reconciler's kernel operations through the root module, one at a time.

Thin on purpose: every decision (what to apply, in which order, what to fall
back to) is in the op; this only calls the matching `Firewall` verb under the
one kernel lock and answers with a `Done` or a `Failed`. `Kernel` is the slice
of `segd.firewall.kernel.Firewall` the agent uses, so a test can hand in a
fake kernel that parses the plans' nft text.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from segd.agent.ops import (
    ApplyTable,
    Done,
    Failed,
    Forget,
    GateChange,
    GateRebuild,
    GateSubnets,
    ListGate,
    ListTable,
    LookupPorts,
    Ns,
    Op,
    Result,
)
from segd.agent.sharing import NsId
from segd.firewall.kernel import NamespaceGone, NsRef
from segd.firewall.plan import Plan


class Kernel(Protocol):
    """What the agent asks of the kernel (`segd.firewall.kernel.Firewall`)."""

    @property
    def host_namespaces(self) -> frozenset[NsId]: ...

    @property
    def open_namespaces(self) -> int: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def apply(self, ns: NsRef, plan: Plan) -> None: ...

    async def list_table(self, ns: NsRef) -> str | None: ...

    async def forget(self, ns: NsRef) -> None: ...

    async def ports(self, ns: NsRef) -> dict[str, str]: ...

    async def gate_apply(self, plan: Plan) -> None: ...

    async def gate_list(self) -> str | None: ...


def _ref(ns: Ns) -> NsRef:
    return NsRef(key=ns.key, path=ns.path)


class Executor:
    """One kernel, one lock: ops run one at a time, whoever asks."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.lock = asyncio.Lock()

    async def run(self, op: Op) -> Result:
        async with self.lock:
            try:
                return await self._run(op)
            except NamespaceGone as e:
                return Failed(op, str(e), gone=True)
            except Exception as e:  # reported to the reconciler, which fails closed
                return Failed(op, repr(e))

    async def _run(self, op: Op) -> Result:
        k = self.kernel
        match op:
            case ApplyTable(ns=ns, plan=plan, listed=listed):
                if plan is not None:
                    await k.apply(_ref(ns), plan)
                return Done(op, listing=await k.list_table(_ref(ns)) if listed else None)
            case LookupPorts(ns=ns):
                return Done(op, ports=await k.ports(_ref(ns)))
            case Forget(ns=ns):
                await k.forget(_ref(ns))
            case GateChange(plan=plan) | GateRebuild(plan=plan) | GateSubnets(plan=plan):
                await k.gate_apply(plan)
            case ListTable(ns=ns):
                return Done(op, listing=await k.list_table(_ref(ns)))
            case ListGate():
                return Done(op, listing=await k.gate_list())
        return Done(op)
