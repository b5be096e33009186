"""A pairing load generator: registered agents pair distinct containers at once.

This drives a running server over HTTP exactly as agents do (signed requests,
one aiohttp session, keep-alive connections) and records every attempt: what
was sent, what came back (or that nothing did), and how long it took. The fault
tests use it to storm a server they then kill; the benchmark uses it to measure
pairing throughput.

    admin = AdminClient(url, token)
    agents = await register_agents(url, admin, 16)
    tokens = await issue_keys(admin, "web", {"role": "web"}, keys=4, max_uses=10_000)
    result = await pair_storm(url, agents, n=2000, concurrency=16, tokens=tokens)
    print(result.rate(), result.latency_p(0.99))
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import nacl.signing

from segd import crypto

PAIR_PATH = "/v1/agent/pair"
BASE_IP = int(ipaddress.IPv4Address("10.64.0.0"))


@dataclasses.dataclass(frozen=True)
class LoadAgent:
    """A registered agent: the host id the server gave it and its signing key."""

    host_id: str
    key: nacl.signing.SigningKey


@dataclasses.dataclass(frozen=True)
class PairAttempt:
    """One pairing request and what came of it (`status` None: no answer at all)."""

    index: int
    host_id: str
    container_id: str
    ip: str
    key_id: str
    status: int | None
    error: str  # the API error code, or the client-side failure; "" on success
    workload_id: str
    instructions_version: int
    latency_s: float

    @property
    def acknowledged(self) -> bool:
        return self.status == 200


@dataclasses.dataclass(frozen=True)
class StormResult:
    attempts: list[PairAttempt]
    elapsed_s: float
    concurrency: int

    def acknowledged(self) -> list[PairAttempt]:
        return [a for a in self.attempts if a.acknowledged]

    def answered(self) -> list[PairAttempt]:
        return [a for a in self.attempts if a.status is not None]

    def rate(self) -> float:
        """Answered attempts per second (refusals count: the server decided them)."""
        return len(self.answered()) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency_p(self, q: float) -> float:
        lat = sorted(a.latency_s for a in self.answered())
        if not lat:
            return 0.0
        return lat[min(len(lat) - 1, int(q * len(lat)))]


class AdminClient:
    """The few admin calls a load run needs (bearer token, JSON in and out)."""

    def __init__(self, url: str, token: str, session: aiohttp.ClientSession) -> None:
        self.url = url.rstrip("/")
        self.session = session
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(
            method, self.url + path, json=body, headers=self.headers
        ) as r:
            data = await r.read()
            if r.status >= 400:
                raise RuntimeError(f"{method} {path}: {r.status} {data.decode(errors='replace')}")
            return json.loads(data) if data else None


def ip_of(index: int) -> str:
    """A distinct address per request index (10.64.0.0/10 gives four million)."""
    return str(ipaddress.IPv4Address(BASE_IP + 1 + index))


def key_id_of(token: str) -> str:
    claims = token.split(".")[1]
    return str(json.loads(crypto.b64d(claims))["kid"])


async def agent_get(
    session: aiohttp.ClientSession, url: str, agent: LoadAgent, path_qs: str
) -> tuple[int, bytes]:
    """A signed GET as the agent, e.g. a long-poll for instructions."""
    headers = crypto.sign_request(agent.key, agent.host_id, "GET", path_qs, b"", time.time())
    async with session.get(url.rstrip("/") + path_qs, headers=headers) as r:
        return r.status, await r.read()


async def register_agents(url: str, admin: AdminClient, n: int) -> list[LoadAgent]:
    out: list[LoadAgent] = []
    for i in range(n):
        code = await admin.call("POST", "/v1/activation-codes", {})
        key = nacl.signing.SigningKey.generate()
        body = {
            "activation_code": code["code"],
            "public_key": crypto.b64e(bytes(key.verify_key)),
            "hostname": f"load-{i}",
        }
        async with admin.session.post(url.rstrip("/") + "/v1/agent/register", json=body) as r:
            reg = json.loads(await r.read())
            if r.status != 201:
                raise RuntimeError(f"register: {r.status} {reg}")
        out.append(LoadAgent(reg["host_id"], key))
    return out


async def issue_keys(
    admin: AdminClient,
    profile: str,
    labels: dict[str, str],
    *,
    keys: int,
    max_uses: int,
    locked: Sequence[str] = (),
) -> list[str]:
    """A profile and `keys` keys for it; returns the tokens."""
    await admin.call(
        "POST",
        "/v1/profiles",
        {"name": profile, "labels": labels, "locked": list(locked), "max_uses": max_uses},
    )
    out = []
    for _ in range(keys):
        issued = await admin.call("POST", "/v1/keys", {"profile": profile})
        out.append(str(issued["token"]))
    return out


async def pair_storm(
    url: str,
    agents: Sequence[LoadAgent],
    n: int,
    concurrency: int,
    *,
    tokens: Sequence[str],
    prefix: str = "c",
    first_index: int = 0,
    timeout: float = 30.0,  # noqa: ASYNC109 - per-request HTTP timeout
    session: aiohttp.ClientSession | None = None,
    read_versions: bool = False,
    on_attempt: Callable[[PairAttempt], object] | None = None,
) -> StormResult:
    """Send `n` pairings from `concurrency` clients; client `j` speaks for agent
    `j % len(agents)`. Request `i` pairs container `{prefix}-{i}` at `ip_of(i)`
    with `tokens[i % len(tokens)]`. Every attempt is returned, answered or not;
    `read_versions` also reads each answer's instructions version;
    `on_attempt` sees each attempt as it ends (to break something mid-storm)."""
    own = session is None
    sess = session or aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, force_close=False)
    )
    key_ids = [key_id_of(t) for t in tokens]
    base = url.rstrip("/")
    attempts: list[PairAttempt] = []
    counter = iter(range(first_index, first_index + n))
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    async def one(agent: LoadAgent, i: int) -> PairAttempt:
        cid, ip = f"{prefix}-{i}", ip_of(i)
        body = json.dumps(
            {"container_id": cid, "pairing_key": tokens[i % len(tokens)], "ips": [ip]}
        ).encode()
        headers = crypto.sign_request(
            agent.key, agent.host_id, "POST", PAIR_PATH, body, time.time()
        )
        headers["Content-Type"] = "application/json"
        status: int | None = None
        error, workload_id, version = "", "", 0
        started = time.perf_counter()
        try:
            async with sess.post(
                base + PAIR_PATH, data=body, headers=headers, timeout=client_timeout
            ) as r:
                data = await r.read()
                status = r.status
            got = json.loads(data)
            if status == 200:
                workload_id = got["workload_id"]
                if read_versions:
                    version = int(got["version"])
            else:
                error = str(got.get("error", ""))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            error = error or type(e).__name__
        return PairAttempt(
            index=i,
            host_id=agent.host_id,
            container_id=cid,
            ip=ip,
            key_id=key_ids[i % len(tokens)],
            status=status,
            error=error,
            workload_id=workload_id,
            instructions_version=version,
            latency_s=time.perf_counter() - started,
        )

    async def client(j: int) -> None:
        agent = agents[j % len(agents)]
        for i in counter:
            attempt = await one(agent, i)
            attempts.append(attempt)
            if on_attempt is not None:
                on_attempt(attempt)

    started = time.perf_counter()
    try:
        async with asyncio.TaskGroup() as tg:
            for j in range(concurrency):
                tg.create_task(client(j))
    finally:
        elapsed = time.perf_counter() - started
        if own:
            await sess.close()
    attempts.sort(key=lambda a: a.index)
    return StormResult(attempts, elapsed, concurrency)
