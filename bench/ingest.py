"""Flow ingest by `segd server`, and pairing while flows pour in.

A fresh `segd server` process gets the three-tier policy of `bench.pairing`,
`agents` registered agents and `workloads` paired containers (spread over the
agents). Then:

- *ingest rate*: `senders` clients post signed `POST /v1/agent/flows` batches
  of `batch` records (each record one of the sender's host's containers with
  one peer, both ends resolved by the server, verdicts mixed) for `seconds`;
  the figure is records kept per second. Baseline: the same signed batches to
  `bench.fixed_server` (reads the body, answers fixed JSON), so the figure
  reads against what HTTP, signing and the body alone cost.
- *pairing under ingest*: 16 clients pair new containers for `seconds` while
  the senders go on; the figure is the pairing latency p99, against the same
  pairing load on the same server with no flows coming in (half just before,
  half just after). Flows go to a SQLite file and a thread of their own, so
  the two should be close.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from bench.estate import fake_ip
from bench.pairing import Load, LoadAgent, _fixed, _merge, drive, register_agents
from bench.report import Figure, Section, Size, figure, ms, pct
from bench.stack import BenchError, Server
from segd import crypto, wire

FLOWS_PATH = "/v1/agent/flows"
UNPACED = "[server.flows]\nmax_records_per_s = 0\n"
PHASE_IPS = 30_000  # each pairing phase its own addresses (the estate has the first)
VERDICTS: tuple[wire.Verdict, ...] = ("allowed", "blocked", "potentially_blocked")


@dataclass(frozen=True)
class Params:
    agents: int
    workloads: int
    batch: int
    senders: int
    seconds: float

    @classmethod
    def of(cls, size: Size) -> Params:
        if size == "tiny":
            return cls(agents=4, workloads=64, batch=200, senders=2, seconds=2.0)
        return cls(agents=16, workloads=512, batch=500, senders=4, seconds=8.0)


def batches(agents: list[LoadAgent], cids: list[list[str]], p: Params) -> list[tuple[int, bytes]]:
    """One encoded batch per agent: its own containers, with peers among all."""
    enc = msgspec.json.Encoder()
    now = time.time()
    out = []
    for a in range(len(agents)):
        records = [
            wire.FlowRecordIn(
                container_id=cids[a][i % len(cids[a])],
                direction="in" if i % 2 else "out",
                peer_ip=fake_ip(i * 7 % p.workloads),
                proto="tcp",
                port=5432 if i % 3 else 8080,
                verdict=VERDICTS[i % 3],
                connections=1 + i % 5,
                first_seen=now - 30,
                last_seen=now - 1,
            )
            for i in range(p.batch)
        ]
        out.append((a, enc.encode(wire.FlowBatchIn(records=records))))
    return out


async def send(
    url: str, agents: list[LoadAgent], bodies: list[tuple[int, bytes]], senders: int, stop: float
) -> tuple[int, dict[str, int]]:
    """Post the batches round-robin until `stop` (perf_counter); (records sent ok, statuses)."""
    counter = itertools.count()
    statuses: dict[str, int] = {}
    sent = [0]
    records = msgspec.json.decode(bodies[0][1], type=wire.FlowBatchIn).records

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as sess:

        async def sender() -> None:
            while time.perf_counter() < stop:
                a, body = bodies[next(counter) % len(bodies)]
                agent = agents[a]
                headers = crypto.sign_request(
                    agent.key, agent.host_id, "POST", FLOWS_PATH, body, time.time()
                )
                headers["Content-Type"] = "application/json"
                try:
                    async with sess.post(url + FLOWS_PATH, data=body, headers=headers) as r:
                        await r.read()
                        status = str(r.status)
                except (aiohttp.ClientError, OSError, TimeoutError) as e:
                    status = type(e).__name__
                statuses[status] = statuses.get(status, 0) + 1
                if status in ("200", "204"):
                    sent[0] += len(records)

        await asyncio.gather(*(sender() for _ in range(senders)))
    return sent[0], statuses


async def _run(p: Params, root: Path, config: str) -> dict[str, Any]:
    fixed, fixed_url = _fixed(root)
    server = Server(root, config)
    server.start()
    try:
        server.rule({"role": "api"}, {"role": "web"}, "tcp/8080")
        server.rule({"role": "db"}, {"role": "api"}, "tcp/5432")
        tokens = [
            server.key(f"bench-{r}", {"role": r, "app": "bench"}, max_uses=1_000_000)
            for r in ("web", "api", "db")
        ]
        agents = register_agents(server, p.agents)
        pre = await drive(
            server.url, agents, tokens, concurrency=8, requests=p.workloads, seconds=60,
            prefix="pre",
        )  # fmt: skip
        if pre.ok != p.workloads:
            raise BenchError(f"could not pair the estate: {pre.statuses}")
        # `drive` gives container i to agent i % agents
        cids = [[f"pre-{i:07d}" for i in range(a, p.workloads, p.agents)] for a in range(p.agents)]
        bodies = batches(agents, cids, p)
        out: dict[str, Any] = {"batch_bytes": len(bodies[0][1])}
        # ingest rate, bracketed by the baseline
        for label, url in (("fixed", fixed_url), ("segd", server.url), ("fixed2", fixed_url)):
            share = 1.0 if label == "segd" else 0.5
            t0 = time.perf_counter()
            n, statuses = await send(url, agents, bodies, p.senders, t0 + p.seconds * share)
            out[label] = (n, time.perf_counter() - t0, statuses)
        kept = server.api("GET", "/v1/flows?limit=1")["flows"]
        if not kept:
            raise BenchError("no flow was kept")
        # pairing: quiet, under ingest, quiet
        loads: list[Load] = []
        for n_phase, (phase, ingest) in enumerate((("q1", False), ("busy", True), ("q2", False))):
            share = 1.0 if ingest else 0.5
            pairing = drive(
                server.url, agents, tokens, concurrency=16, requests=PHASE_IPS,
                seconds=p.seconds * share, prefix=phase, first=(n_phase + 1) * PHASE_IPS,
            )  # fmt: skip
            if ingest:
                stop = time.perf_counter() + p.seconds * share
                load, (n, statuses) = await asyncio.gather(
                    pairing, send(server.url, agents, bodies, p.senders, stop)
                )
                out["ingest_while_pairing"] = (n, p.seconds * share, statuses)
            else:
                load = await pairing
            loads.append(load)
        out["pair_busy"] = loads[1]
        out["pair_quiet"] = _merge(loads[0], loads[2])
        server.proc.check_alive("segd server")
    finally:
        server.stop()
        fixed.stop()
    return out


def run(size: Size) -> Section:
    p = Params.of(size)
    with tempfile.TemporaryDirectory(prefix="segd-bench-") as tmp:
        (Path(tmp) / "unpaced").mkdir()
        (Path(tmp) / "paced").mkdir()
        # as fast as the server takes them in, then as configured by default
        out = asyncio.run(_run(p, Path(tmp) / "unpaced", UNPACED))
        paced = asyncio.run(_run(p, Path(tmp) / "paced", ""))
    n, elapsed, statuses = out["segd"]
    b1, e1, _ = out["fixed"]
    b2, e2, _ = out["fixed2"]
    rate = n / elapsed if elapsed else 0.0
    base = (b1 + b2) / (e1 + e2) if e1 + e2 else 0.0
    figs: list[Figure] = [
        figure(
            "ingest.records_per_s",
            f"flow records kept/s, unpaced ({p.batch} a batch, {p.senders} senders)",
            rate,
            "/s",
            baseline=base,
            baseline_label="fixed-JSON handler, same signed batches",
            ratio="of",
        ),
    ]
    for name, o in (("unpaced", out), ("paced", paced)):
        busy, quiet = o["pair_busy"], o["pair_quiet"]
        taken, secs, _ = o["ingest_while_pairing"]
        what = f"{name}, {taken / secs:,.0f} records/s"
        figs += [
            figure(
                f"ingest.{name}.pairing_p99",
                f"pairing p99 (16 clients) under ingest ({what})",
                ms(pct(busy.latencies, 0.99)),
                "ms",
                baseline=ms(pct(quiet.latencies, 0.99)),
                baseline_label="same server, no flows",
                ratio="of",
            ),
            figure(
                f"ingest.{name}.pairing_rate",
                f"pairings/s (16 clients) under ingest ({name})",
                busy.rate,
                "/s",
                baseline=quiet.rate,
                baseline_label="same server, no flows",
                ratio="of",
            ),
        ]
    busy, quiet = out["pair_busy"], out["pair_quiet"]
    n2, e3, st2 = out["ingest_while_pairing"]
    details = {
        "params": p.__dict__,
        "paced_ingest_statuses": paced["ingest_while_pairing"][2],
        "batch_bytes": out["batch_bytes"],
        "ingest_statuses": statuses,
        "ingest_while_pairing_records_per_s": round(n2 / e3, 1) if e3 else 0,
        "ingest_while_pairing_statuses": st2,
        "pairing_p50_ms": {
            "busy": ms(pct(busy.latencies, 0.5)),
            "quiet": ms(pct(quiet.latencies, 0.5)),
        },
        "pairing_statuses": {"busy": busy.statuses, "quiet": quiet.statuses},
    }
    return Section(
        name="ingest",
        title="7. Flow ingest, and pairing while flows pour in",
        figures=figs,
        details=details,
    )
