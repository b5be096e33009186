"""Pairing while another address floods `POST /v1/agent/register`, and what the
flood leaves in the audit and the store.

A fresh `segd server` process gets one pairing key and one registered agent.
One client pairs containers one after another (signed, each a real pairing)
for `seconds` while a flooder process, from another loopback address
(127.0.0.2), sends registrations with unknown activation codes over `flooders`
keep-alive connections as fast as the server answers; then the flooder goes on
alone for `seconds` more. The baseline is the same client with nothing else
going on, for half of `seconds` just before the flood and half just after it
(pooled), so that a passing disturbance of the machine weighs on both alike.
The server is stopped (which writes any pending refusal summaries) and its
store read directly.

Figures: median and p99 pairing latency during the flood against the quiet
run; the audit rows the whole flood added (pairings' own rows left out); how
much the store grew while the flooder ran alone (pages in use, WAL included).
The flooder runs as `python -m bench.flood URL SECONDS CONNECTIONS` and prints
its status counts.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nacl.signing

from bench.estate import fake_ip
from bench.pairing import PAIR_PATH, LoadAgent, register_agents
from bench.report import Figure, Section, Size, Target, figure, ms, pct
from bench.stack import BenchError, Server
from segd import crypto
from segd.wire import PairIn

REGISTER_PATH = "/v1/agent/register"
FLOOD_FROM = "127.0.0.2"  # another source than the pairing client's 127.0.0.1


@dataclass(frozen=True)
class Params:
    seconds: float  # per phase
    flooders: int  # the flooder's concurrent connections

    @classmethod
    def of(cls, size: Size) -> Params:
        if size == "tiny":
            return cls(seconds=2.0, flooders=32)
        return cls(seconds=8.0, flooders=128)


@dataclass
class Pairings:
    latencies: list[float]
    statuses: dict[str, int]


async def pair_for(
    url: str, agent: LoadAgent, token: str, seconds: float, first: int, prefix: str
) -> Pairings:
    """One client pairing new containers one after another for `seconds`."""
    enc = msgspec.json.Encoder()
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as sess:
        async with sess.get(url + "/v1/health") as r:  # open the connection first
            await r.read()
        deadline = time.perf_counter() + seconds
        i = first
        while time.perf_counter() < deadline:
            body = enc.encode(
                PairIn(
                    container_id=f"{prefix}-{i:07d}",
                    pairing_key=token,
                    ips=[fake_ip(i)],
                    name=f"flood-{i}",
                )
            )
            headers = crypto.sign_request(
                agent.key, agent.host_id, "POST", PAIR_PATH, body, time.time()
            )
            headers["Content-Type"] = "application/json"
            t = time.perf_counter()
            async with sess.post(url + PAIR_PATH, data=body, headers=headers) as r:
                await r.read()
                statuses[str(r.status)] += 1
            latencies.append(time.perf_counter() - t)
            i += 1
    return Pairings(latencies, dict(statuses))


async def flood(url: str, seconds: float, connections: int) -> dict[str, int]:
    """Unknown activation codes as fast as the server answers, from `FLOOD_FROM`."""
    statuses: Counter[str] = Counter()
    key = crypto.b64e(bytes(nacl.signing.SigningKey.generate().verify_key))
    conn = aiohttp.TCPConnector(limit=connections, local_addr=(FLOOD_FROM, 0))
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=30)
    ) as sess:
        deadline = time.perf_counter() + seconds
        n = 0

        async def one() -> None:
            nonlocal n
            while time.perf_counter() < deadline:
                n += 1
                body = {"activation_code": f"act_bogus{n}", "public_key": key, "hostname": "x"}
                try:
                    async with sess.post(url + REGISTER_PATH, json=body) as r:
                        await r.read()
                        statuses[str(r.status)] += 1
                except (aiohttp.ClientError, OSError, TimeoutError) as e:
                    statuses[type(e).__name__] += 1

        await asyncio.gather(*(one() for _ in range(connections)))
    return dict(statuses)


def _query(db: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """Read the store beside the running server (WAL: what it committed)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def _store_bytes(db: Path) -> int:
    """Pages in use (the WAL's included), not the file sizes, which lag and jump."""
    [(pages,)] = _query(db, "PRAGMA page_count")
    [(free,)] = _query(db, "PRAGMA freelist_count")
    [(size,)] = _query(db, "PRAGMA page_size")
    return int((pages - free) * size)


def _last_audit_id(db: Path) -> int:
    return int(_query(db, "SELECT coalesce(max(id), 0) FROM audit")[0][0])


def _flooder(url: str, seconds: float, connections: int) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "bench.flood", url, str(seconds), str(connections)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def _flood_result(proc: subprocess.Popen[str], seconds: float) -> dict[str, int]:
    out, _ = proc.communicate(timeout=seconds + 60)
    if proc.returncode != 0:
        raise BenchError(f"the flooder failed ({proc.returncode})")
    got: dict[str, int] = json.loads(out)
    return got


def _measure(p: Params, root: Path) -> dict[str, Any]:
    server = Server(root)
    server.start()
    db = root / "server" / "segd.db"
    try:
        token = server.key("flood", {"role": "web", "app": "bench"}, max_uses=1_000_000)
        [agent] = register_agents(server, 1)
        half = p.seconds / 2
        before = asyncio.run(pair_for(server.url, agent, token, half, 0, "quiet"))
        first_id = _last_audit_id(db)
        flooder = _flooder(server.url, 2 * p.seconds, p.flooders)
        loud = asyncio.run(pair_for(server.url, agent, token, p.seconds, 1_000_000, "flood"))
        bytes0 = _store_bytes(db)  # the flooder now runs alone
        attempts = _flood_result(flooder, 2 * p.seconds)
        bytes1 = _store_bytes(db)
        flood_rows = _last_audit_id(db) - first_id
        after = asyncio.run(pair_for(server.url, agent, token, half, 2_000_000, "quiet2"))
        server.proc.check_alive("segd server")
    finally:
        server.stop()
    # Each pairing wrote one row of its own; the summaries pending at the end are
    # written at shutdown (after the quiet pairings that followed).
    events = _query(
        db, "SELECT event || ' ' || result, count(*) FROM audit WHERE id > ? GROUP BY 1", first_id
    )
    by_event = {str(k): int(v) for k, v in events}
    pairing_rows = sum(loud.statuses.values()) + sum(after.statuses.values())
    quiet = Pairings(
        before.latencies + after.latencies, dict(Counter(before.statuses) + Counter(after.statuses))
    )
    return {
        "quiet": quiet,
        "loud": loud,
        "attempts": attempts,
        "audit_rows_by_the_end": flood_rows - sum(loud.statuses.values()),
        "audit_rows": sum(by_event.values()) - pairing_rows,
        "audit_events": by_event,
        "store_bytes_before": bytes0,
        "store_growth_bytes": bytes1 - bytes0,
    }


def run(size: Size) -> Section:
    p = Params.of(size)
    with tempfile.TemporaryDirectory(prefix="segd-bench-") as tmp:
        m = _measure(p, Path(tmp))
    quiet, loud = m["quiet"], m["loud"]
    for name, load in (("quiet", quiet), ("flood", loud)):
        if not load.latencies or load.statuses.get("200", 0) == 0:
            raise BenchError(f"no pairing succeeded in the {name} run: {load.statuses}")
    attempts = sum(m["attempts"].values())
    if attempts == 0:
        raise BenchError(f"the flooder sent nothing: {m['attempts']}")
    flood_s = 2 * p.seconds
    figs: list[Figure] = [
        figure(
            "flood.pairing.p50",
            "pairing p50 during a register flood",
            ms(pct(loud.latencies, 0.5)),
            "ms",
            baseline=ms(pct(quiet.latencies, 0.5)),
            baseline_label="no flood",
            ratio="of",
            targets=[Target("<=", 2.0, on="ratio")],
        ),
        figure(
            "flood.pairing.p99",
            "pairing p99 during a register flood",
            ms(pct(loud.latencies, 0.99)),
            "ms",
            baseline=ms(pct(quiet.latencies, 0.99)),
            baseline_label="no flood",
            ratio="of",
        ),
        figure(
            "flood.audit_rows",
            "audit rows the flood added",
            m["audit_rows"],
            "rows",
            baseline=attempts,
            baseline_label="refused attempts",
            ratio="of",
            targets=[Target("<=", 10.0)],
        ),
        figure(
            "flood.store_growth",
            "store growth, flood alone",
            m["store_growth_bytes"] / 2**20,
            "MiB",
            baseline=m["store_bytes_before"] / 2**20,
            baseline_label="store before",
        ),
    ]
    details: dict[str, Any] = {
        "params": p.__dict__,
        "audit_rows_when_the_flood_ended": m["audit_rows_by_the_end"],
        "flood_attempts": m["attempts"],
        "flood_attempts_per_s": round(attempts / flood_s),
        "audit_events_since_flood": m["audit_events"],
        "pairings": {
            "quiet": {"n": len(quiet.latencies), "statuses": quiet.statuses},
            "flood": {"n": len(loud.latencies), "statuses": loud.statuses},
        },
    }
    return Section(
        name="flood",
        title="6. Pairing during a register flood, and what the flood leaves",
        figures=figs,
        details=details,
    )


if __name__ == "__main__":
    url, seconds, connections = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(asyncio.run(flood(url, seconds, connections))))
