"""`GET /v1/explain`: the pure `explain` over the server's model as it is now.

The model is the compiler's (workloads, and the compiled policies and peer sets
of the hosts of the two ends, the same the agents enforce), the rules, the
dimensions each workload's profile locks, each host's mesh subnet, and the
addresses of containers whose pairing was refused (`unpaired`).
"""

from __future__ import annotations

from segd import wire
from segd.server import explain
from segd.server.core import Core
from segd.server.unpaired import UnpairedSeen


async def explain_request(
    core: Core, seen: UnpairedSeen, src: str, dst: str, port: str
) -> wire.Explanation:
    proto, number = explain.parse_port(port)
    c = core.compiler
    workloads = c.workloads()

    def refused(ip: str) -> explain.Unpaired | None:
        r = seen.get(ip)
        return None if r is None else explain.Unpaired(ip, r.host_id, r.container_id, r.reason)

    a = explain.resolve(src, workloads, "src", refused)
    b = explain.resolve(dst, workloads, "dst", refused)
    policies: dict[str, wire.WorkloadPolicy] = {}
    sets: dict[str, dict[str, list[str]]] = {}
    for host in sorted({e.host_id for e in (a, b) if isinstance(e, wire.Workload)}):
        instr = c.compile_host(host, 0)
        policies.update((p.workload_id, p) for p in instr.workloads)
        sets[host] = instr.sets
    model = explain.Model(
        workloads=workloads,
        policies=policies,
        sets=sets,
        rules=c.rules(),
        locked=await core.store.locked_dimensions(),
        subnets={h.id: h.subnet for h in await core.store.hosts() if h.subnet},
    )
    return explain.explain(a, b, proto, number, model)
