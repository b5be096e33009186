"""A fake host for the agent: network namespaces that follow the fake Docker
engine's containers, each with its own `Ruleset`, and the kernel verbs of
`segd.firewall.kernel.Firewall` over them.

A container started on `bridge` gets a namespace with one veth (its host-side
name `veth<7 hex>`, as Docker names them) holding its address; `--network
container:X` joins X's namespace, `host` the host's. A namespace lives while a
process is in it. Plans run with the root module's rules: each script one
transaction, the plan's fallback when its first is refused.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from segd.agent.sharing import NsId
from segd.firewall.gate import GATE
from segd.firewall.kernel import HostNamespace, NamespaceGone, NftError, NsRef
from segd.firewall.plan import Plan, Table
from segd.firewall.render import CONTAINER
from tests.agent_inproc.nft import Ruleset, accepts, gate_admits
from tests.orchestrator.fake_engine import FakeContainer, FakeEngine

HOST_NS: NsId = (4, 4026531840)
_PROC = re.compile(r"^/proc/(\d+)/ns/net$")


@dataclass
class Netns:
    id: NsId
    ruleset: Ruleset = field(default_factory=Ruleset)
    ports: dict[str, str] = field(default_factory=dict)  # ip -> host-side veth
    pids: set[int] = field(default_factory=set)
    plans: list[str] = field(default_factory=list)  # names of the plans run here, in order


class FakeHost:
    """Namespaces of the fake engine's containers, and a `Kernel` over them."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.host = Netns(HOST_NS)
        self.namespaces: dict[NsId, Netns] = {}
        self.by_pid: dict[int, Netns] = {}
        self.bound: set[str] = set()  # keys with an endpoint (Firewall.open_namespaces)
        self.refuse: Callable[[str, Plan], bool] = lambda where, plan: False
        self._open = asyncio.Event()
        self._open.set()
        self.waiting = 0  # container applies held by `pause`
        self._inode = 4026532000
        engine.hooks.append(self._on_container)

    # ---- namespaces follow containers ------------------------------------------------

    def _on_container(self, what: str, c: FakeContainer) -> None:
        if what == "start":
            ns = self._ns_for(c)
            ns.pids.add(c.pid)
            self.by_pid[c.pid] = ns
        else:
            ns = self.by_pid.pop(c.pid)
            ns.pids.discard(c.pid)
            if not ns.pids and ns is not self.host:
                del self.namespaces[ns.id]

    def _ns_for(self, c: FakeContainer) -> Netns:
        if c.mode == "host":
            return self.host
        if c.mode.startswith("container:"):
            owner = self.engine.find(c.mode[10:])
            assert owner is not None and owner.pid, "joins a running container"
            return self.by_pid[owner.pid]
        self._inode += 1
        ns = Netns((4, self._inode))
        self.namespaces[ns.id] = ns
        if c.ip:
            ns.ports[c.ip] = "veth" + secrets.token_hex(4)[:7]
        return ns

    def ns_of(self, path: str) -> NsId | None:
        """What `stat` of a /proc/PID/ns/net says (None: no such process)."""
        ns = self._resolve(path)
        return ns.id if ns is not None else None

    def _resolve(self, path: str) -> Netns | None:
        m = _PROC.match(path)
        return self.by_pid.get(int(m.group(1))) if m else None

    def netns(self, c: FakeContainer) -> Netns:
        return self.by_pid[c.pid]

    # ---- what a test asks -------------------------------------------------------------

    def table(self, c: FakeContainer) -> str | None:
        return self.netns(c).ruleset.listing(str(CONTAINER))

    def gate(self) -> str | None:
        return self.host.ruleset.listing(str(GATE))

    def reachable(self, src: FakeContainer, dst: FakeContainer, proto: str, port: int) -> bool:
        """Whether a new connection from `src` to `dst` on proto/port gets through:
        the gate on both bridge ports, `src`'s output chain, `dst`'s input chain."""
        a, b = self.netns(src), self.netns(dst)
        gate = self.host.ruleset.tables.get(str(GATE))
        for ns, ip in ((a, src.ip), (b, dst.ip)):
            if not gate_admits(gate, ns.ports.get(ip, "eth0"), ip):
                return False
        out_table = a.ruleset.tables.get(str(CONTAINER))
        in_table = b.ruleset.tables.get(str(CONTAINER))
        return accepts(out_table, "output", dst.ip, proto, port) and accepts(
            in_table, "input", src.ip, proto, port
        )

    def pause(self) -> None:
        """Hold every container apply until `resume` (a slow kernel)."""
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    # ---- the kernel verbs (segd.agent.executor.Kernel) ----------------------------------

    @property
    def host_namespaces(self) -> frozenset[NsId]:
        return frozenset({HOST_NS})

    @property
    def open_namespaces(self) -> int:
        return len(self.bound)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self.bound.clear()

    def _container_ns(self, ref: NsRef) -> Netns:
        ns = self._resolve(ref.path)
        if ns is None:
            raise NamespaceGone(f"{ref.path}: no such namespace")
        if ns is self.host:
            raise HostNamespace(f"{ref.path} is the host's network namespace")
        self.bound.add(ref.key)
        return ns

    def _run(self, ns: Netns, plan: Plan, where: str) -> None:
        for i, tx in enumerate(plan.txs):
            try:
                if i == 0 and self.refuse(where, plan):
                    raise NftError("Error: Could not process rule: File exists")
                ns.ruleset.run(tx)
            except NftError:
                if i > 0 or plan.fallback is None:
                    raise
                self._run(ns, plan.fallback, where)
                return
        ns.plans.append(plan.what)

    async def apply(self, ns: NsRef, plan: Plan) -> None:
        if not self._open.is_set():
            self.waiting += 1
            try:
                await self._open.wait()
            finally:
                self.waiting -= 1
        self._run(self._container_ns(ns), plan, ns.key)

    async def list_table(self, ns: NsRef, table: Table = CONTAINER) -> str | None:
        return self._container_ns(ns).ruleset.listing(str(table))

    async def forget(self, ns: NsRef) -> None:
        self.bound.discard(ns.key)

    async def ports(self, ns: NsRef) -> dict[str, str]:
        return dict(self._container_ns(ns).ports)

    async def gate_apply(self, plan: Plan) -> None:
        self._run(self.host, plan, "gate")

    async def gate_list(self, table: Table = GATE) -> str | None:
        return self.host.ruleset.listing(str(table))
