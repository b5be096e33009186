"""Fleet: the segd mesh across simulated hosts (the test bed, segd.bed), and how a
host's instructions grow with the fleet (pure compiler).

On the bed (three hosts, a server with a mesh pool on the underlay, one agent
per host; rules `cons` -> `prov` on tcp/8080 and tcp/5001):

- a host joining: its agent starts -> the `segd` network exists -> a provider
  started there as soon as it does is reachable (real TCP connects) from a
  consumer on every other host. Baseline: the same for a provider started on a
  host already in the mesh;
- cross-host time to enforce: a consumer paired on host 2 (the server's pairing
  time) -> its own table on host 2 and the providers' sets on hosts 1 and 3 in
  place (the agents' `enforce.done`). Baseline: a consumer paired on host 1 ->
  its table and host 1's provider's sets (one host);
- mesh throughput: one TCP stream (the same small Python sender and receiver)
  between a consumer on host 2 and a provider on host 1 through WireGuard,
  against the same stream between the two hosts' namespaces on the underlay.

Pure: the instructions (encoded bytes) and mesh peers of a host as the fleet
grows from a few hosts to many, every other host running an unrelated app.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

from bench.report import Section, Size, figure, ms, summary
from bench.stack import BenchError, LogTail, iso_ts, wait_for
from segd.bed import Bed
from segd.bed.fleet import Fleet
from segd.server.compiler import Compiler, encode_instructions
from segd.wire import MeshPeer, Rule, Workload

PROV = ["sh", "-c", "httpd -p 8080 -h /www && exec sleep 1000000"]
CONS = ["sh", "-c", "exec sleep 1000000"]
STREAM_PORT = 5001
# One TCP stream: `recv PORT` prints "ready", then {"bytes", "seconds"} from its
# first byte to the sender's end; `send IP PORT BYTES`.
STREAM = r"""
import json, socket, sys, time
if sys.argv[1] == "recv":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[2])))
    s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept()
    buf, n, t0 = bytearray(1 << 20), 0, None
    while True:
        k = c.recv_into(buf)
        if not k:
            break
        if t0 is None:
            t0 = time.perf_counter()
        n += k
    print(json.dumps({"bytes": n, "seconds": time.perf_counter() - t0}), flush=True)
    c.close()
else:
    c = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=30)
    chunk, left = b"\0" * (1 << 20), int(sys.argv[4])
    while left > 0:
        c.sendall(chunk[: min(left, len(chunk))])
        left -= len(chunk)
    c.close()
"""

# `IP PORT TIMEOUT`: TCP connects until one succeeds; prints when (time.time()).
REACH = r"""
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[3])
while time.monotonic() < deadline:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.05).close()
        print(time.time())
        break
    except OSError:
        time.sleep(0.005)
"""


@dataclass(frozen=True)
class Params:
    samples: int  # pairings timed, cross-host and same-host each
    stream_mib: int  # MiB in each stream
    streams: int  # streams per path
    fleet_sizes: tuple[int, ...]  # hosts, for the instructions size

    @classmethod
    def of(cls, size: Size) -> Params:
        if size == "tiny":
            return cls(samples=3, stream_mib=16, streams=1, fleet_sizes=(4, 10, 30))
        return cls(samples=20, stream_mib=256, streams=3, fleet_sizes=(4, 40, 400, 1000))


def run(size: Size) -> Section:
    p = Params.of(size)
    details: dict[str, Any] = {"params": p.__dict__}
    sizes = instruction_sizes(p.fleet_sizes)
    details["instructions"] = sizes
    with tempfile.TemporaryDirectory(prefix="segd-bench-fleet-") as tmp:
        bed = Bed.up(3)
        details["bed_up_s"] = round(bed.up_seconds, 2)
        try:
            fleet = Fleet(
                bed, Path(tmp), agent_options={"reconcile_interval_s": 30.0, "backoff_max_s": 2.0}
            )
            try:
                details.update(_on_bed(fleet, p))
            finally:
                fleet.close()
        finally:
            left = bed.down()
            if left:
                details["bed_left"] = left
    return Section(
        name="fleet",
        title="fleet: the segd mesh on the test bed (3 hosts)",
        figures=_figures(details),
        details=details,
    )


def _figures(d: dict[str, Any]) -> list[Any]:
    e, join, st, ins = d["enforce"], d["join"], d["stream"], d["instructions"]
    small, big = ins[0], ins[-1]
    cross, same = e["cross_ms"], e["same_ms"]
    return [
        figure(
            f"fleet.enforce.{q}",
            f"pairing on host 2 -> its table and providers' sets on hosts 1, 3, {q}",
            cross[q],
            "ms",
            baseline=same[q],
            baseline_label="beside its provider (one host)",
            ratio="of",
        )
        for q in ("p50", "p99")
    ] + [
        figure(
            "fleet.join",
            "host joining: agent start -> its container reachable from every host",
            join["join_s"],
            "s",
            baseline=join["container_s"],
            baseline_label="new container on a joined host",
            ratio="of",
        ),
        figure(
            "fleet.throughput",
            "one TCP stream between containers on two hosts, through the mesh",
            st["mesh_mbit_s"],
            "Mbit/s",
            baseline=st["underlay_mbit_s"],
            baseline_label="the underlay",
            ratio="of",
        ),
        figure(
            "fleet.instructions.unrelated",
            f"instructions of a host with an unrelated app, {big['hosts']} hosts",
            big["unrelated_bytes"],
            "B",
            baseline=small["unrelated_bytes"],
            baseline_label=f"{small['hosts']} hosts",
            ratio="of",
        ),
        figure(
            "fleet.instructions.related",
            f"instructions of the shop's api host, {big['hosts']} hosts",
            big["related_bytes"],
            "B",
            baseline=small["related_bytes"],
            baseline_label=f"{small['hosts']} hosts",
            ratio="of",
        ),
        figure(
            "fleet.instructions.peers",
            f"mesh peers of a host with an unrelated app, {big['hosts']} hosts",
            big["unrelated_peers"],
            "",
            baseline=big["hosts"] - 1,
            baseline_label="every other host",
        ),
    ]


# ---- on the bed ------------------------------------------------------------------------


@dataclass
class _Shop:
    fleet: Fleet
    prov: str  # the provider's key
    cons: str
    consumers: dict[int, tuple[str, str]]  # host -> a consumer container there, its netns
    providers: dict[int, tuple[str, str]]  # host -> a provider container and its address
    tails: dict[int, LogTail]

    def sandbox(self, i: int, cid: str) -> str:
        return self.fleet.bed.host(i).docker(
            "inspect", "-f", "{{.NetworkSettings.SandboxKey}}", cid
        )

    def reach(self, froms: Sequence[int], ip: str, timeout: float = 90) -> float:
        """Until `ip`:8080 connects from the consumer of every host in `froms`
        (connect attempts every few ms from inside each); when the last did."""
        bed = self.fleet.bed
        procs = []
        for i in froms:
            argv = ["nsenter", f"--net={self.consumers[i][1]}", sys.executable, "-c", REACH]
            argv += [ip, "8080", str(timeout)]
            procs.append(bed.host(i).popen(argv, stdout=subprocess.PIPE, text=True))
        try:
            outs = [p.communicate(timeout=timeout + 30)[0].strip() for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if not all(outs):
            raise BenchError(f"{ip}:8080 not reachable from every host of {list(froms)}")
        return max(float(o) for o in outs)


def _on_bed(fleet: Fleet, p: Params) -> dict[str, Any]:
    fleet.start_server()
    fleet.rule("cons", "prov", "tcp/8080")
    fleet.rule("cons", "prov", f"tcp/{STREAM_PORT}")
    shop = _Shop(fleet, fleet.key("prov"), fleet.key("cons"), {}, {}, {})
    fleet.join_all([1, 2])
    shop.providers[1] = fleet.run(1, "prov1", shop.prov, PROV)
    for i in (1, 2):
        cid = fleet.run(i, f"cons{i}", shop.cons, CONS)[0]
        shop.consumers[i] = (cid, shop.sandbox(i, cid))
    shop.reach([1, 2], shop.providers[1][1])
    out: dict[str, Any] = {"join": _join(shop)}
    for i, a in fleet.agents.items():
        shop.tails[i] = LogTail(a.log_path)
        shop.tails[i].read()  # from now on
    out["enforce"] = _enforce(shop, p.samples)
    out["stream"] = _stream(shop, p)
    return out


def _join(shop: _Shop) -> dict[str, float]:
    """Host 3 joins; then, the baseline, a provider on host 1."""
    fleet = shop.fleet
    t0 = time.time()
    agent = fleet.agent(3)
    agent.start(wait=False)
    wait_for(lambda: fleet.has_network(3), 60, "host 3's segd network", interval=0.02)
    t_net = time.time()
    shop.providers[3] = fleet.run(3, "prov3", shop.prov, PROV)
    t_end = shop.reach([1, 2], shop.providers[3][1])
    cid = fleet.run(3, "cons3", shop.cons, CONS)[0]
    shop.consumers[3] = (cid, shop.sandbox(3, cid))
    shop.reach([3], shop.providers[1][1])
    t1 = time.time()
    _, ip = fleet.run(1, "prov1b", shop.prov, PROV)
    t1_end = shop.reach([2, 3], ip)
    return {
        "join_s": round(t_end - t0, 3),
        "network_s": round(t_net - t0, 3),
        "container_s": round(t1_end - t1, 3),
    }


def _events(shop: _Shop, i: int, into: list[dict[str, Any]]) -> list[dict[str, Any]]:
    into.extend(shop.tails[i].read())
    return into


def _first(
    recs: list[dict[str, Any]], event: str, container: str, after: float = 0.0
) -> float | None:
    for r in recs:
        if r.get("event") != event or r.get("container") != container[:12]:
            continue
        if event == "enforce.done" and r.get("kind") != "workload":
            continue
        ts = iso_ts(str(r["timestamp"]))
        if ts >= after:
            return ts
    return None


def _enforce(shop: _Shop, samples: int) -> dict[str, Any]:
    cross: list[float] = []
    same: list[float] = []
    for n in range(samples):
        cross.append(_pairing(shop, 2, (1, 3), f"x2-{n}"))
        same.append(_pairing(shop, 1, (1,), f"x1-{n}"))
    return {"cross_ms": summary([ms(v) for v in cross]), "same_ms": summary([ms(v) for v in same])}


def _pairing(shop: _Shop, where: int, others: tuple[int, ...], name: str) -> float:
    """A consumer paired on host `where` (from the server's pairing time) -> its own
    table there and the providers' sets on `others` in place; then it goes, and its
    unpairing reaches both providers before the next sample."""
    fleet = shop.fleet
    prov = {i: shop.providers[i][0] for i in (1, 3)}
    logs: dict[int, list[dict[str, Any]]] = {i: [] for i in (1, 2, 3)}

    def updated(waits: list[tuple[int, str]], after: float) -> float | None:
        """When the last of the containers in `waits` had its table updated after `after`."""
        ts = [_first(_events(shop, i, logs[i]), "enforce.done", c, after) for i, c in waits]
        return None if None in ts else max(t for t in ts if t is not None)

    cid, _ = fleet.run(where, name, shop.cons, CONS)
    wait_for(
        lambda: _first(_events(shop, where, logs[where]), "workload.paired", cid),
        30,
        "the consumer's pairing",
        interval=0.01,
    )
    # Another host may apply the pairing before the pairing host hears the answer.
    paired = next(
        float(w["paired_at"]) for w in fleet.api("GET", "/v1/workloads") if w["container_id"] == cid
    )
    waits = [(where, cid), *((i, prov[i]) for i in others)]
    done: float = wait_for(lambda: updated(waits, paired), 30, "the tables", interval=0.01)
    gone = time.time()
    fleet.remove(where, cid)
    wait_for(lambda: updated([(1, prov[1]), (3, prov[3])], gone), 30, "the unpairing")
    return done - paired


def _stream(shop: _Shop, p: Params) -> dict[str, Any]:
    bed = shop.fleet.bed
    h1, h2 = bed.host(1), bed.host(2)
    sandbox = {
        i: bed.host(i).docker("inspect", "-f", "{{.NetworkSettings.SandboxKey}}", cid)
        for i, cid in ((1, shop.providers[1][0]), (2, shop.consumers[2][0]))
    }
    nbytes = p.stream_mib << 20
    mesh: list[float] = []
    underlay: list[float] = []
    for _ in range(p.streams):
        for book, recv_ns, send_ns, ip in (
            (mesh, sandbox[1], sandbox[2], shop.providers[1][1]),
            (underlay, "", "", h1.address),
        ):
            enter_r = ["nsenter", f"--net={recv_ns}"] if recv_ns else []
            enter_s = ["nsenter", f"--net={send_ns}"] if send_ns else []
            recv = h1.popen(
                [*enter_r, sys.executable, "-c", STREAM, "recv", str(STREAM_PORT)],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert recv.stdout is not None
                if recv.stdout.readline().strip() != "ready":
                    raise BenchError("the stream receiver did not start")
                h2.run(
                    *enter_s,
                    sys.executable,
                    "-c",
                    STREAM,
                    "send",
                    ip,
                    str(STREAM_PORT),
                    str(nbytes),
                    timeout=300,
                )
                res = json.loads(recv.communicate(timeout=60)[0])
            finally:
                if recv.poll() is None:
                    recv.kill()
                    recv.wait()
            if res["bytes"] != nbytes:
                raise BenchError(f"the stream got {res['bytes']} of {nbytes} bytes")
            book.append(res["bytes"] * 8 / res["seconds"] / 1e6)
    return {
        "mesh_mbit_s": round(median(mesh), 1),
        "underlay_mbit_s": round(median(underlay), 1),
        "mesh_runs": [round(v, 1) for v in mesh],
        "underlay_runs": [round(v, 1) for v in underlay],
        "bytes": nbytes,
    }


# ---- pure: instructions as the fleet grows ----------------------------------------------

POOL = ipaddress.IPv4Network("10.0.0.0/8")  # /24 per host: room for 65,536 hosts


def _subnet(i: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network((int(POOL.network_address) + (i << 8), 24))


def _workload(i: int, host: int, labels: dict[str, str], nth: int) -> Workload:
    return Workload(
        id=f"w_{i:016x}",
        host_id=f"h_{host:016x}",
        container_id=f"c{i:011d}",
        name=f"w{i}",
        labels=labels,
        ips=[str(_subnet(host).network_address + 2 + nth)],
        key_id="k_0000000000000000",
        paired_at=0.0,
    )


def fleet_estate(hosts: int) -> tuple[list[Rule], list[Workload], list[MeshPeer]]:
    """The shop on hosts 0-2 (web, api, db; web -> api, api -> db) and on every
    other host an app of its own (web -> db, both on that host)."""
    rules = [
        Rule(id="r_shop_api", providers=[{"app": "shop", "role": "api"}],
             consumers=[{"app": "shop", "role": "web"}], services=["tcp/8080"]),
        Rule(id="r_shop_db", providers=[{"app": "shop", "role": "db"}],
             consumers=[{"app": "shop", "role": "api"}], services=["tcp/5432"]),
    ]  # fmt: skip
    workloads = [
        _workload(i, i, {"app": "shop", "role": role}, 0)
        for i, role in enumerate(("web", "api", "db"))
    ]
    for h in range(3, hosts):
        app = f"app{h}"
        rules.append(
            Rule(id=f"r_{h:08x}", providers=[{"app": app, "role": "db"}],
                 consumers=[{"app": app, "role": "web"}], services=["tcp/5432"])
        )  # fmt: skip
        for nth, role in enumerate(("web", "db")):
            workloads.append(_workload(len(workloads), h, {"app": app, "role": role}, nth))
    peers = [
        MeshPeer(
            host_id=f"h_{h:016x}",
            public_key=base64.b64encode(h.to_bytes(32, "big")).decode(),
            endpoint=f"192.0.2.{h % 250 + 1}:51820",
            subnet=str(_subnet(h)),
        )
        for h in range(max(hosts, 3))
    ]
    return rules, workloads, peers


def instruction_sizes(fleet_sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Per fleet size (at least 4 hosts): the encoded instructions and mesh peers of
    the shop's api host and of the last host (an unrelated app)."""
    out = []
    for n in fleet_sizes:
        rules, workloads, peers = fleet_estate(n)
        c = Compiler(rules, workloads, pool=str(POOL), mesh=peers)
        t0 = time.perf_counter()
        compiled = c.compile_all()
        took = time.perf_counter() - t0
        api, other = compiled[f"h_{1:016x}"], compiled[f"h_{n - 1:016x}"]
        out.append(
            {
                "hosts": n,
                "related_bytes": len(encode_instructions(api)),
                "related_peers": len(api.mesh.peers) if api.mesh else -1,
                "unrelated_bytes": len(encode_instructions(other)),
                "unrelated_peers": len(other.mesh.peers) if other.mesh else -1,
                "total_bytes": sum(len(encode_instructions(i)) for i in compiled.values()),
                "compile_all_s": round(took, 4),
            }
        )
    return out
