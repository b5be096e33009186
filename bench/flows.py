"""Agent CPU per 1,000 logged packets a second: segd's flow path against reading alone.

A throwaway network namespace (`ip netns add`, deleted afterwards) holds a
table that logs every UDP datagram to ports 9000-9999 to segd's NFLOG group
with a segd prefix (no rate limit, unlike what segd renders: here every packet
is a flow event). A paced sender inside the namespace sends `rate` datagrams a
second for `seconds`, over 1,000 ports (1,000 flow records); the per-namespace
read budget is lifted for the measurement. This process reads
them through `Firewall`'s NFLOG reader (opened as for a container) and hands
them to the agent's flow reporter (`FlowReporter.on_log`: metrics and the
per-interval aggregation). Reported: this process's CPU time per second of
traffic, per 1,000 packets a second, and the share of packets read. Baseline,
in the same run: the same reader with a callback that drops what it is given
(reading and parsing only).

Packet to record visible in the API: a `segd server` process, one agent
registered with it, and the same namespace, reader and reporter, now sending
its signed batches to that server every `interval` seconds (15 s, the
shortest `[agent] flow_interval_s`). A sender in the namespace sends one
datagram to a port of its own, `probes` of them spread evenly over
`intervals` flow intervals; each is a flow record of its own (an unpaired
container's, the peer external). Reported, per datagram: the time from its
sending to its flow arriving on the server's live stream (`GET
/v1/flows/stream`, published once the flow is stored, when `GET /v1/flows`
lists it), p50 and p99. Baseline, in the same run: the time from sending to
the agent's batch carrying it leaving for the server (the aggregation interval
is most of both).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nacl.signing

from bench.pairing import register_agents
from bench.report import Figure, Section, Size, figure, pct
from bench.stack import BenchError, Server, require_kernel
from segd import wire
from segd.agent.client import ServerClient
from segd.agent.flows import Directory
from segd.agent.metrics import AgentMetrics
from segd.agent.reporter import FlowReporter
from segd.firewall import nflog, render
from segd.firewall.kernel import Firewall, LogPacket, NsRef
from segd.firewall.plan import Plan

_SEND = r"""
import socket, sys, time
rate, seconds = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n, t0, tick = 0, time.monotonic(), 0.01
while True:
    now = time.monotonic() - t0
    if now >= seconds:
        break
    due = int(now * rate)
    while n < due:
        s.sendto(b"x", ("127.0.0.1", 9000 + n % 1000))
        n += 1
    time.sleep(tick)
print(n, flush=True)
"""


# One datagram a port, at its time: prints "port sent_at" (wall clock) for each.
_PROBE = r"""
import socket, sys, time
probes, seconds = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t0 = time.monotonic()
for i in range(probes):
    delay = t0 + i * seconds / probes - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    s.sendto(b"x", ("127.0.0.1", 9000 + i))
    print(9000 + i, repr(time.time()), flush=True)
"""
CID = "b" * 64  # the bench namespace's container id: unpaired on the server


@dataclass(frozen=True)
class Params:
    rate: int
    seconds: float
    interval: float = 15.0  # the agent's flow interval in the visibility run
    intervals: int = 3  # how many intervals the probes are spread over
    probes: int = 300

    @classmethod
    def of(cls, size: Size) -> Params:
        if size == "tiny":
            return cls(rate=2000, seconds=1.0, interval=1.0, intervals=2, probes=20)
        return cls(rate=10_000, seconds=5.0)


def _table() -> Plan:
    log = nflog.statement("in", "blocked")
    return Plan(
        "bench",
        (
            "table inet segd {\n\tchain input {\n"
            "\t\ttype filter hook input priority filter; policy accept;\n"
            f"\t\tudp dport 9000-9999 {log}\n\t}}\n}}\n",
        ),
    )


async def _one(
    p: Params, ns: str, name: str, on_log: Callable[[str, list[LogPacket], int], None]
) -> dict[str, float]:
    read = [0]

    def counting(key: str, packets: list[LogPacket], lost: int) -> None:
        read[0] += len(packets)
        on_log(key, packets, lost)

    async with Firewall(on_log=counting, log_budget=10**9) as fw:  # measure, do not cap
        ref = NsRef(key="bench", path=f"/run/netns/{ns}")
        await fw.apply(ref, render.render_removal())
        # a plan the kernel module opens a reader after, with the bench's table
        await fw.apply(ref, Plan("workload", _table().txs))
        if fw.log_readers != 1:
            raise BenchError("no NFLOG reader in the bench namespace")
        cpu0, t0 = time.process_time(), time.monotonic()
        sender = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-c",
            _SEND,
            str(p.rate),
            str(p.seconds),
            stdout=subprocess.PIPE,
        )
        out, _ = await sender.communicate()
        await asyncio.sleep(0.3)  # the last batch (NFLOG flushes every 0.1 s)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    sent = int(out.split()[-1]) if out.split() else 0
    if not sent:
        raise BenchError(f"{name}: the sender sent nothing")
    return {"cpu_s": cpu, "wall_s": wall, "sent": sent, "read": read[0]}


async def _measure(p: Params, ns: str) -> dict[str, dict[str, float]]:
    metrics = AgentMetrics()
    client = ServerClient("http://127.0.0.1:9", nacl.signing.SigningKey.generate())
    reporter = FlowReporter(
        client, lambda: Directory({}, {}), metrics, interval=15.0, backoff_max=1.0
    )
    try:
        base = await _one(p, ns, "baseline", lambda _k, _p, _l: None)
        segd = await _one(p, ns, "segd", reporter.on_log)
    finally:
        await client.close()
    segd["records"] = reporter.flows.close_interval(Directory({}, {}))
    return {"baseline": base, "segd": segd}


def _per_1k(r: dict[str, float], p: Params) -> float:
    """CPU milliseconds per second of traffic, per 1,000 packets a second."""
    per_s = r["cpu_s"] / p.seconds
    return per_s / (p.rate / 1000) * 1000


class _StampedClient(ServerClient):
    """The agent's client, noting when each batch leaves (port -> wall clock)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.left: dict[int, float] = {}

    async def flows(self, batch: wire.FlowBatchIn) -> None:
        now = time.time()
        for r in batch.records:
            self.left.setdefault(r.port, now)
        await super().flows(batch)


async def _watch(
    url: str, token: str, seen: dict[int, float], ready: asyncio.Event, want: int
) -> None:
    """Follow the server's live flow stream; note when each port's flow arrives
    until `want` have (`ready` is set once it follows)."""
    flow = msgspec.json.Decoder(wire.Flow)
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with (
        aiohttp.ClientSession(timeout=timeout) as sess,
        sess.get(url + "/v1/flows/stream", headers=headers) as resp,
    ):
        if resp.status != 200:
            raise BenchError(f"GET /v1/flows/stream -> {resp.status}")
        ready.set()
        async for line in resp.content:
            if line.startswith(b"data: "):
                now = time.time()
                f = flow.decode(line[6:])
                seen.setdefault(f.port, now)
                if len(seen) >= want:
                    return


async def _visible(p: Params, ns: str, server: Server) -> dict[str, Any]:
    [agent] = register_agents(server, 1)
    client = _StampedClient(server.url, agent.key, agent.host_id)
    reporter = FlowReporter(
        client, lambda: Directory({}, {}), AgentMetrics(), interval=p.interval, backoff_max=1.0
    )
    seen: dict[int, float] = {}
    ready = asyncio.Event()
    sent: dict[int, float] = {}
    tasks: list[asyncio.Task[None]] = []
    try:
        async with Firewall(on_log=reporter.on_log) as fw:
            ref = NsRef(key=CID, path=f"/run/netns/{ns}")
            await fw.apply(ref, render.render_removal())
            await fw.apply(ref, Plan("workload", _table().txs))
            watch = asyncio.create_task(_watch(server.url, server.token, seen, ready, p.probes))
            tasks.append(watch)
            await asyncio.wait_for(ready.wait(), 10)
            tasks.append(asyncio.create_task(reporter.run()))
            sender = await asyncio.create_subprocess_exec(
                *("ip", "netns", "exec", ns, sys.executable, "-c", _PROBE),
                *(str(p.probes), str(p.interval * p.intervals)),
                stdout=subprocess.PIPE,
            )
            out, _ = await sender.communicate()
            for line in out.decode().splitlines():
                port, at = line.split()
                sent[int(port)] = float(at)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(watch), 2 * p.interval + 10)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()
    missing = sorted(set(sent) - set(seen))
    if missing:
        raise BenchError(f"{len(missing)} of {len(sent)} probes never became visible")
    listed = len(server.api("GET", f"/v1/flows?limit={p.probes}&verdict=blocked")["flows"])
    return {
        "visible_s": sorted(seen[k] - sent[k] for k in sent),
        "batch_s": sorted(client.left[k] - sent[k] for k in sent if k in client.left),
        "after_s": sorted(seen[k] - client.left[k] for k in sent if k in client.left),
        "probes": len(sent),
        "listed": listed,
    }


def _visible_run(p: Params, ns: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="segd-bench-") as tmp:
        server = Server(Path(tmp))
        server.start()
        try:
            return asyncio.run(_visible(p, ns, server))
        finally:
            server.stop()


def run(size: Size) -> Section:
    require_kernel()
    p = Params.of(size)
    ns = f"segd-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        r = asyncio.run(_measure(p, ns))
        vis = _visible_run(p, ns)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)
    seg, base = r["segd"], r["baseline"]
    figs: list[Figure] = [
        figure(
            "flows.cpu_per_1k",
            f"agent CPU per 1,000 logged packets/s ({p.rate:,}/s)",
            round(_per_1k(seg, p), 2),
            "ms/s",
            baseline=round(_per_1k(base, p), 2),
            baseline_label="NFLOG read and parse only",
            ratio="of",
        ),
        figure(
            "flows.read_share",
            "share of logged packets read",
            round(seg["read"] / seg["sent"], 4),
            "",
            baseline=round(base["read"] / base["sent"], 4),
            baseline_label="NFLOG read and parse only",
        ),
    ]
    every = f"a flow interval of {p.interval:g} s"
    for q in (0.5, 0.99):
        tag = f"p{round(q * 100)}"
        figs.append(
            figure(
                f"flows.visible_{tag}",
                f"packet -> flow record in the API, {tag} ({every})",
                round(pct(vis["visible_s"], q), 2),
                "s",
                baseline=round(pct(vis["batch_s"], q), 2),
                baseline_label="packet -> the agent's batch leaving",
                ratio="of",
            )
        )
    figs.append(
        figure(
            "flows.batch_to_visible_p99",
            "the agent's batch leaving -> its records in the API, p99",
            round(pct(vis["after_s"], 0.99) * 1000, 1),
            "ms",
        )
    )
    details: dict[str, Any] = {
        "params": p.__dict__,
        "segd": seg,
        "baseline": base,
        "visible": {
            "probes": vis["probes"],
            "listed_by_get": vis["listed"],
            "p50_s": round(pct(vis["visible_s"], 0.5), 3),
            "p99_s": round(pct(vis["visible_s"], 0.99), 3),
            "max_s": round(max(vis["visible_s"]), 3),
            "batch_p50_s": round(pct(vis["batch_s"], 0.5), 3),
            "batch_p99_s": round(pct(vis["batch_s"], 0.99), 3),
        },
        "batch_to_visible_ms": {
            "p50": round(pct(vis["after_s"], 0.5) * 1000, 1),
            "p99": round(pct(vis["after_s"], 0.99) * 1000, 1),
        },
    }
    return Section(
        name="flows",
        title="7. Flow records: agent CPU, packet to API (kernel)",
        figures=figs,
        details=details,
    )
