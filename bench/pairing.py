"""Pairing throughput of `segd server` over HTTP on loopback.

For each concurrency level a fresh `segd server` process (its own SQLite file,
`synchronous=FULL`) gets the three-tier policy (web -> api tcp/8080, api -> db
tcp/5432), one pairing key per role and 16 registered agents whose hosts joined
the segd mesh (a pool of 198.18.0.0/15, a /20 per host). N clients then
send signed `POST /v1/agent/pair` requests (`segd.crypto.sign_request`, the
agents' own signing code) over keep-alive connections, each for a new
container with its own mesh address from its host's subnet (so, as in a fleet,
a pairing changes the sets of every host whose workloads reference it),
rotating over the agents and the roles, until
`requests` are answered or `seconds` have passed. Every pairing is a real one:
the key use is counted, the workload recorded and the hosts it affects
published at the commit's generation; the answer carries the workload, its
labels and the host's instructions version (the agent's long-poll brings the
instructions themselves; nobody long-polls here, so no instructions are signed).

Baseline: `bench.fixed_server` (an aiohttp handler that reads the body and
answers a fixed small JSON, in its own process) driven by the same client with
the same signed requests, at the same concurrency, for half the budget just
before and half just after the segd run (the two halves pooled).

At 16 clients the same server also answers, for half the budget, signed
requests that do nothing: a long-poll for instructions newer than any
(`since` far ahead, `wait=0`, answered 204). Its rate against the same baseline
splits the gap: what the signed HTTP request costs, and what the pairing does.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import itertools
import os
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nacl.signing

from bench.estate import fake_ip
from bench.report import Figure, Section, Size, Target, figure, ms, pct
from bench.stack import BenchError, Proc, Server, free_port, threads_cpu_s, wait_for
from segd import crypto
from segd.http.client import Client
from segd.wire import ActivationCodeIn, MeshJoined, MeshJoinIn, PairIn, Registered, RegisterIn

PAIR_PATH = "/v1/agent/pair"
NOOP_PATH = f"/v1/agent/instructions?since={2**62}&wait=0"
MESH_PATH = "/v1/agent/mesh"
# The agents' hosts are in the mesh and pair addresses of their own subnets, so a
# pairing reaches every host whose workloads reference its sets, as in a fleet.
MESH_CONFIG = '[server.mesh]\npool = "198.18.0.0/15"\nhost_prefix = 20\n'
ROLES = ("web", "api", "db")


@dataclass(frozen=True)
class Params:
    levels: tuple[int, ...]
    requests: int  # per level, at most
    seconds: float  # per level, at most
    agents: int

    @classmethod
    def of(cls, size: Size) -> Params:
        if size == "tiny":
            return cls(levels=(1, 16, 64), requests=96, seconds=3.0, agents=4)
        return cls(levels=(1, 16, 64), requests=6000, seconds=8.0, agents=16)


@dataclass(frozen=True)
class LoadAgent:
    host_id: str
    key: nacl.signing.SigningKey
    subnet: ipaddress.IPv4Network | None = None  # its mesh subnet, once it joined

    def address(self, n: int) -> str:
        """Its n-th container's address: in its mesh subnet, else a distinct fake one."""
        if self.subnet is None:
            return fake_ip(n)
        return str(self.subnet.network_address + 1 + n % (self.subnet.num_addresses - 2))


@dataclass
class Load:
    ok: int
    statuses: dict[str, int]
    latencies: list[float]
    elapsed: float
    server_cpu_pct: float = 0.0  # of one core, over the run
    client_cpu_pct: float = 0.0
    answer_bytes: int = 0  # all response bodies together

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0


Request = tuple[str, str, bytes]  # method, path and query, body


def pairings(
    agents: list[LoadAgent], tokens: list[str], prefix: str, first: int = 0
) -> Callable[[int], Request]:
    """The i-th request: a pairing of a new container, rotating over the agents and
    the keys; each agent's containers take its addresses from its `first` on."""
    enc = msgspec.json.Encoder()

    def make(i: int) -> Request:
        agent = agents[i % len(agents)]
        body = enc.encode(
            PairIn(
                container_id=f"{prefix}-{i:07d}",
                pairing_key=tokens[i % len(tokens)],
                ips=[agent.address(first + i // len(agents))],
                name=f"bench-{i}",
            )
        )
        return "POST", PAIR_PATH, body

    return make


def noops(i: int) -> Request:
    """A signed request the server answers without doing anything (204)."""
    return "GET", NOOP_PATH, b""


async def drive(
    url: str,
    agents: list[LoadAgent],
    tokens: list[str],
    *,
    concurrency: int,
    requests: int,
    seconds: float,
    prefix: str,
    first: int = 0,
    make: Callable[[int], Request] | None = None,
) -> Load:
    """`concurrency` clients send signed requests (pairings unless `make` says
    otherwise) until `requests` or `seconds` run out, each signed by the agent
    whose turn it is; 200 and 204 count as answered."""
    make = make or pairings(agents, tokens, prefix, first)
    counter = itertools.count()
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    answered = [0]  # response body bytes
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=60)
    ) as sess:
        # Open every keep-alive connection before the clock starts.
        async def warm() -> None:
            async with sess.get(url + "/v1/health") as r:
                await r.read()

        await asyncio.gather(*(warm() for _ in range(concurrency)))
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < deadline:
                i = next(counter)
                if i >= requests:
                    return
                agent = agents[i % len(agents)]
                method, path, body = make(i)
                headers = crypto.sign_request(
                    agent.key, agent.host_id, method, path, body, time.time()
                )
                if body:
                    headers["Content-Type"] = "application/json"
                t = time.perf_counter()
                try:
                    async with sess.request(method, url + path, data=body, headers=headers) as r:
                        answered[0] += len(await r.read())
                        status = str(r.status)
                except (aiohttp.ClientError, OSError, TimeoutError) as e:
                    status = type(e).__name__
                latencies.append(time.perf_counter() - t)
                statuses[status] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ok = statuses.get("200", 0) + statuses.get("204", 0)
    return Load(ok, dict(statuses), latencies, elapsed, answer_bytes=answered[0])


def register_agents(server: Server, n: int, *, mesh: bool = False) -> list[LoadAgent]:
    out = []
    client = Client(server.url, server.token)
    for i in range(n):
        code = server.api("POST", "/v1/activation-codes", ActivationCodeIn())["code"]
        key = nacl.signing.SigningKey.generate()
        body = RegisterIn(
            activation_code=code,
            public_key=crypto.b64e(bytes(key.verify_key)),
            hostname=f"bench-{i}",
        )
        registered = client.get(Registered, "POST", "/v1/agent/register", body)
        agent = LoadAgent(registered.host_id, key)
        if mesh:
            agent = LoadAgent(agent.host_id, key, _join_mesh(server, agent, i))
        out.append(agent)
    return out


def _join_mesh(server: Server, agent: LoadAgent, i: int) -> ipaddress.IPv4Network:
    """Join the agent's host to the mesh (a made-up WireGuard key): its subnet."""
    body = msgspec.json.encode(
        MeshJoinIn(
            public_key=base64.b64encode(bytes([1 + i % 250, *os.urandom(31)])).decode(),
            endpoint=f"127.0.0.1:{51820 + i}",
        )
    )
    headers = crypto.sign_request(agent.key, agent.host_id, "PUT", MESH_PATH, body, time.time())
    headers["Content-Type"] = "application/json"
    req = urllib.request.Request(server.url + MESH_PATH, body, headers, method="PUT")
    with urllib.request.urlopen(req, timeout=30) as r:
        joined = msgspec.json.decode(r.read(), type=MeshJoined)
    return ipaddress.IPv4Network(joined.subnet)


def _segd(root: Path, p: Params) -> tuple[Server, list[LoadAgent], list[str]]:
    server = Server(root, MESH_CONFIG)
    server.start()
    try:
        server.rule({"role": "api"}, {"role": "web"}, "tcp/8080")
        server.rule({"role": "db"}, {"role": "api"}, "tcp/5432")
        tokens = [
            server.key(f"bench-{r}", {"role": r, "app": "bench"}, max_uses=1_000_000) for r in ROLES
        ]
        return server, register_agents(server, p.agents, mesh=True), tokens
    except BaseException:
        server.stop()
        raise


def _fixed(root: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc(
        [sys.executable, "-m", "bench.fixed_server", str(port)],
        root / "fixed.log",
    )
    proc.start()
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        proc.check_alive("fixed-response server")
        try:
            with urllib.request.urlopen(url + "/", timeout=1):
                return True
        except OSError:
            return False

    wait_for(up, 30, "fixed-response server", interval=0.05)
    return proc, url


def _merge(a: Load, b: Load) -> Load:
    statuses = Counter(a.statuses)
    statuses.update(b.statuses)
    elapsed = a.elapsed + b.elapsed

    def cpu(x: float, y: float) -> float:
        return (x * a.elapsed + y * b.elapsed) / elapsed if elapsed else 0.0

    return Load(
        a.ok + b.ok,
        dict(statuses),
        a.latencies + b.latencies,
        elapsed,
        cpu(a.server_cpu_pct, b.server_cpu_pct),
        cpu(a.client_cpu_pct, b.client_cpu_pct),
        a.answer_bytes + b.answer_bytes,
    )


@dataclass
class Level:
    segd: Load
    base: Load  # the fixed-JSON handler, both halves
    recorded: int  # workloads in the store afterwards
    noop: Load | None = None  # signed requests that do nothing (16 clients)


async def _level(p: Params, c: int, root: Path, fixed_url: str, fixed_pid: int) -> Level:
    """One level: baseline (half), segd (and, at 16 clients, signed no-ops for half
    the budget), baseline (other half), so that the baseline brackets the segd
    runs and a passing disturbance weighs on them alike."""
    server, agents, tokens = _segd(root, p)
    plan: list[tuple[str, str, int, float, Callable[[int], Request] | None]] = [
        ("base", fixed_url, fixed_pid, 0.5, None),
        ("segd", server.url, server.proc.pid, 1.0, None),
        *([("noop", server.url, server.proc.pid, 0.5, noops)] if c == 16 else []),
        ("base", fixed_url, fixed_pid, 0.5, None),
    ]
    try:
        runs: dict[str, list[Load]] = {}
        for name, url, pid, share, make in plan:
            cpu0, me0 = threads_cpu_s(pid), time.process_time()
            load = await drive(
                url,
                agents,
                tokens,
                concurrency=c,
                requests=int(p.requests * share),
                seconds=p.seconds * share,
                prefix=f"c{c}",
                make=make,
            )
            load.server_cpu_pct = 100 * (threads_cpu_s(pid) - cpu0) / load.elapsed
            load.client_cpu_pct = 100 * (time.process_time() - me0) / load.elapsed
            runs.setdefault(name, []).append(load)
        recorded = server.workload_count()
        server.proc.check_alive("segd server")
    finally:
        server.stop()
    noop = runs.get("noop")
    return Level(runs["segd"][0], _merge(*runs["base"]), recorded, noop[0] if noop else None)


async def _run(p: Params, root: Path) -> dict[int, Level]:
    levels: dict[int, Level] = {}
    fixed, fixed_url = _fixed(root)
    try:
        for c in p.levels:
            (root / f"level-{c}").mkdir()
            levels[c] = await _level(p, c, root / f"level-{c}", fixed_url, fixed.pid)
    finally:
        fixed.stop()
    return levels


def run(size: Size) -> Section:
    p = Params.of(size)
    with tempfile.TemporaryDirectory(prefix="segd-bench-") as tmp:
        levels = asyncio.run(_run(p, Path(tmp)))
    for c, lv in levels.items():
        if lv.segd.ok == 0:
            raise BenchError(f"no pairing succeeded at {c} clients: {lv.segd.statuses}")
        if lv.noop is not None and lv.noop.ok == 0:
            raise BenchError(f"no signed no-op was answered at {c} clients: {lv.noop.statuses}")
    figs: list[Figure] = []
    details: dict[str, Any] = {"params": p.__dict__, "levels": {}}
    for c in p.levels:
        lv = levels[c]
        s, b = lv.segd, lv.base
        targets = [Target(">=", 1000.0), Target(">=", 0.4, on="ratio")] if c == 16 else []
        figs.append(
            figure(
                f"pairing.c{c}.rate",
                f"{c} client{'s' if c > 1 else ''}: pairings/s",
                s.rate,
                "/s",
                baseline=b.rate,
                baseline_label="fixed-JSON handler",
                ratio="of",
                targets=targets,
            )
        )
        figs.append(
            figure(
                f"pairing.c{c}.p99",
                f"{c} client{'s' if c > 1 else ''}: latency p99",
                ms(pct(s.latencies, 0.99)),
                "ms",
                baseline=ms(pct(b.latencies, 0.99)),
                baseline_label="fixed-JSON handler",
                ratio="of",
            )
        )
        if lv.noop is not None:
            figs.append(
                figure(
                    f"pairing.c{c}.noop_rate",
                    f"{c} clients: signed requests that do nothing/s",
                    lv.noop.rate,
                    "/s",
                    baseline=b.rate,
                    baseline_label="fixed-JSON handler",
                    ratio="of",
                )
            )
        details["levels"][str(c)] = {
            "pairings": s.ok,
            "recorded_workloads": lv.recorded,
            "server_cpu_us_per_pairing": _cpu_us(s),
            "elapsed_s": round(s.elapsed, 3),
            "statuses": s.statuses,
            "latency_ms": {
                "p50": ms(pct(s.latencies, 0.5)),
                "p99": ms(pct(s.latencies, 0.99)),
                "max": ms(max(s.latencies)),
            },
            "answer_bytes_mean": round(s.answer_bytes / max(1, sum(s.statuses.values()))),
            "server_cpu_pct": round(s.server_cpu_pct, 1),
            "client_cpu_pct": round(s.client_cpu_pct, 1),
            "baseline_server_cpu_pct": round(b.server_cpu_pct, 1),
            "baseline_client_cpu_pct": round(b.client_cpu_pct, 1),
            "baseline_requests": b.ok,
            "baseline_statuses": b.statuses,
            "baseline_latency_ms": {"p50": ms(pct(b.latencies, 0.5))},
        }
        if lv.noop is not None:
            details["levels"][str(c)]["noop"] = {
                "answered": lv.noop.ok,
                "statuses": lv.noop.statuses,
                "server_cpu_us_per_request": _cpu_us(lv.noop),
            }
    return Section(
        name="pairing",
        title="2. Pairing throughput (HTTP, loopback)",
        figures=figs,
        details=details,
    )


def _cpu_us(load: Load) -> float:
    """The server's CPU (all its threads) per answered request, in µs."""
    return round(load.server_cpu_pct / 100 / load.rate * 1e6, 1) if load.rate else 0.0
