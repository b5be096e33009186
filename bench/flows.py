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
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nacl.signing

from bench.report import Figure, Section, Size, figure
from bench.stack import BenchError, require_kernel
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


@dataclass(frozen=True)
class Params:
    rate: int
    seconds: float

    @classmethod
    def of(cls, size: Size) -> Params:
        if size == "tiny":
            return cls(rate=2000, seconds=1.0)
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


def run(size: Size) -> Section:
    require_kernel()
    p = Params.of(size)
    ns = f"segd-bench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        r = asyncio.run(_measure(p, ns))
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
    details: dict[str, Any] = {"params": p.__dict__, "segd": seg, "baseline": base}
    return Section(
        name="flows", title="7. Flow records: agent CPU (kernel)", figures=figs, details=details
    )
