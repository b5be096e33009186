"""What the agent tells about itself: metrics of kernel operations, log lines of
container roles, and the counts a leak check watches."""

from __future__ import annotations

import asyncio
import os

from segd import log
from segd.agent.host import Host, RoleChange
from segd.agent.metrics import AgentMetrics
from segd.agent.ops import (
    ApplyTable,
    Failed,
    GateChange,
    GateRebuild,
    GateSubnets,
    LookupPorts,
    Op,
    Result,
)

_log = log.get(__name__)


def observe_op(metrics: AgentMetrics, op: Op, res: Result, seconds: float) -> None:
    """Metrics of one kernel operation."""
    if isinstance(op, ApplyTable) and op.plan is not None and not isinstance(res, Failed):
        metrics.apply_seconds.observe(seconds)
    if isinstance(res, Failed) and not res.gone:
        match op:
            case ApplyTable():
                metrics.apply_failures.labels("apply").inc()
            case LookupPorts():
                metrics.apply_failures.labels("ports").inc()
            case GateChange() | GateRebuild() | GateSubnets():
                metrics.apply_failures.labels("gate").inc()


def log_role(change: RoleChange) -> None:
    """A container's namespace role, when it is new or changed."""
    info, role = change.info, change.new
    cid = info.id[:12]
    if role.kind == "shares":
        _log.warning(
            "container.shares_namespace",
            container=cid,
            owner=role.owner[:12],
            keyed=bool(info.pairing_key),
            reason="in another container's network namespace: that container's "
            "table applies; not enforced or paired on its own",
        )
    elif role.kind == "host":
        _log.warning(
            "container.host_namespace",
            container=cid,
            keyed=bool(info.pairing_key),
            reason="in the host's network namespace: never enforced or paired",
        )
    elif role.kind == "unknown":
        _log.warning(
            "container.namespace_unknown",
            container=cid,
            reason="its namespace cannot be read, or another container claims it: "
            "not enforced until that clears",
        )
    elif change.old is not None:
        _log.info("container.owns_namespace", container=cid)


def footprint(host: Host, namespaces: int, pairing: int) -> dict[str, int]:
    """Counts that must stay flat under churn (leak checks) and memory."""
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {
        "tasks": len(asyncio.all_tasks()),
        "fds": len(os.listdir("/proc/self/fd")),
        "namespaces": namespaces,
        "containers": len(host.containers),
        "enforced": len(host.enforced),
        "workloads": len(host.workloads),
        "pairing": pairing,
        "rss_kb": rss_pages * os.sysconf("SC_PAGE_SIZE") // 1024,
    }
