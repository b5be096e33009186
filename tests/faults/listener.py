"""What one client can do to the server's listener: `python -m tests.faults.listener`.

A real `segd server` process runs with the open-files limit of a small unit
(`--nofile`, 1,024 by default; soft and hard, so it cannot raise it) and its
configured (or default) connection limits. The figures:

- `idle_capacity`: idle connections are opened 100 at a time, up to 2,000, and
  after each step a new `GET /v1/health` (2 s timeout) is sent: the first count
  at which it fails, or `none`;
- `idle_lifetime_s`: how long the server keeps a connection that never sends a
  byte (median of 10, capped at `--cap` seconds);
- `drip_lifetime_s`: how long it keeps one that sends a header line a second;
- `busy.*_ms`: with 2,000 idle and 200 dripping connections held, the latency of
  an admin request, of a pairing, and of an agent long-poll woken by that
  pairing (or `failed`).

The flood helpers (`hold_idle`, `Drip`, `probe`) serve the listener tests too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from tests.faults.load import AdminClient, LoadAgent, agent_get, issue_keys, register_agents
from tests.faults.proc import ServerProcess

T = TypeVar("T")


def raise_own_nofile(want: int) -> None:
    """This process holds every client socket: raise its soft limit if it can."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        top = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))


@dataclass
class Conn:
    """One client connection and when the server closed it (None: still open)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    opened: float
    closed: float | None = None
    watcher: asyncio.Task[None] | None = None

    @property
    def lifetime(self) -> float | None:
        return None if self.closed is None else self.closed - self.opened

    async def watch(self) -> None:
        """Note when the server closes (EOF, a reset, or any answer then EOF)."""
        try:
            while await self.reader.read(4096):
                pass
        except OSError:
            pass
        self.closed = time.monotonic()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        self.writer.close()


async def connect(host: str, port: int, timeout: float = 5.0) -> Conn | None:  # noqa: ASYNC109
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return None
    c = Conn(reader, writer, time.monotonic())
    c.watcher = asyncio.create_task(c.watch())
    return c


async def hold_idle(host: str, port: int, n: int, batch: int = 100) -> list[Conn]:
    """`n` connections that never send a byte (those that could not connect are left out)."""
    out: list[Conn] = []
    for start in range(0, n, batch):
        got = await asyncio.gather(*(connect(host, port) for _ in range(min(batch, n - start))))
        out += [c for c in got if c is not None]
    return out


@dataclass
class Drip:
    """Connections that send a request line, then one header line every `every` s."""

    host: str
    port: int
    every: float = 1.0
    conns: list[Conn] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self, n: int) -> None:
        for c in await asyncio.gather(*(connect(self.host, self.port) for _ in range(n))):
            if c is not None:
                self.conns.append(c)
                self._tasks.append(asyncio.create_task(self._drip(c)))

    async def _drip(self, c: Conn) -> None:
        c.writer.write(b"GET /v1/health HTTP/1.1\r\nHost: segd\r\n")
        i = 0
        while c.closed is None:
            with contextlib.suppress(OSError):
                c.writer.write(b"X-Drip-%d: x\r\n" % i)
            i += 1
            await asyncio.sleep(self.every)

    def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for c in self.conns:
            c.close()


async def timed(aw: Awaitable[T], timeout: float) -> tuple[T | None, float | None]:  # noqa: ASYNC109
    """(result, seconds), or (None, None) when it failed or took longer than `timeout`."""
    t0 = time.monotonic()
    try:
        result = await asyncio.wait_for(aw, timeout)
    except (OSError, TimeoutError, aiohttp.ClientError):
        return None, None
    return result, time.monotonic() - t0


async def probe(url: str, timeout: float = 2.0) -> bool:  # noqa: ASYNC109
    """A new connection answers `GET /v1/health` within `timeout`."""

    async def get() -> int:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
            s.get(url + "/v1/health") as r,
        ):
            await r.read()
            return r.status

    status, _ = await timed(get(), timeout)
    return status == 200


async def wait_closed(conns: list[Conn], until: float) -> None:
    """Until every connection is closed or the monotonic clock reaches `until`."""
    watchers = [c.watcher for c in conns if c.watcher is not None and c.closed is None]
    if watchers:
        await asyncio.wait(watchers, timeout=max(0.0, until - time.monotonic()))


# ---- the figures ------------------------------------------------------------------------


@dataclass
class Busy:
    """The answers that must come while the listener is flooded."""

    admin_s: float | None
    pair_s: float | None
    longpoll_s: float | None  # from the pairing's send to the long-poll's answer
    pair_status: int | None
    longpoll_status: int | None


async def busy_requests(
    url: str, admin: AdminClient, agent: LoadAgent, token: str, cid: str, within: float
) -> Busy:
    """An admin request, then a long-poll woken by a pairing, each on a new connection."""
    conn = aiohttp.TCPConnector(force_close=True)
    limit = aiohttp.ClientTimeout(total=within + 30)
    async with aiohttp.ClientSession(connector=conn, timeout=limit) as s:
        own = AdminClient(admin.url, admin.headers["Authorization"][7:], s)
        _, admin_s = await timed(own.call("GET", "/v1/rules"), within)
        now, _ = await timed(agent_get(s, url, agent, "/v1/agent/instructions?since=0"), within)
        since = _version(now[1]) if now is not None and now[0] == 200 else 0
        poll = asyncio.create_task(
            timed(agent_get(s, url, agent, f"/v1/agent/instructions?since={since}&wait=30"), 60)
        )
        await asyncio.sleep(0.2)  # the long-poll is waiting
        t0 = time.monotonic()
        paired, pair_s = await timed(_pair(s, url, agent, token, cid), within)
        try:
            polled, _ = await asyncio.wait_for(poll, within)
        except TimeoutError:
            polled = None
        longpoll_s = time.monotonic() - t0 if polled is not None and polled[0] == 200 else None
    return Busy(
        admin_s,
        pair_s,
        longpoll_s,
        None if paired is None else paired[0],
        None if polled is None else polled[0],
    )


def _version(signed: bytes) -> int:
    """The version of signed instructions as the server sent them."""
    from segd import crypto

    return int(json.loads(crypto.b64d(json.loads(signed)["payload"]))["version"])


async def _pair(
    s: aiohttp.ClientSession, url: str, agent: LoadAgent, token: str, cid: str
) -> tuple[int, bytes]:
    from segd import crypto

    body = json.dumps({"container_id": cid, "pairing_key": token, "ips": ["10.77.0.1"]}).encode()
    headers = crypto.sign_request(
        agent.key, agent.host_id, "POST", "/v1/agent/pair", body, time.time()
    )
    headers["Content-Type"] = "application/json"
    async with s.post(url + "/v1/agent/pair", data=body, headers=headers) as r:
        return r.status, await r.read()


async def setup(url: str, token: str) -> tuple[AdminClient, LoadAgent, str]:
    """A registered agent and a pairing key (the admin session stays open)."""
    session = aiohttp.ClientSession()
    admin = AdminClient(url, token, session)
    [agent] = await register_agents(url, admin, 1)
    [key] = await issue_keys(admin, "flood", {"role": "web"}, keys=1, max_uses=1000)
    return admin, agent, key


def _median(values: list[float | None], cap: float) -> str:
    if not values:
        return "-"
    known = [v if v is not None else cap for v in values]
    m = statistics.median(known)
    return f">{cap:g}" if m >= cap else f"{m:.1f}"


async def measure(url: str, token: str, cap: float, idle: int, drip: int) -> dict[str, Any]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    admin, agent, key = await setup(url, token)
    out: dict[str, Any] = {}
    try:
        # How long a silent and a dripping connection are kept, without pressure.
        silent = await hold_idle(host, int(port), 10)
        dripper = Drip(host, int(port))
        await dripper.start(10)
        await wait_closed(silent + dripper.conns, time.monotonic() + cap)
        out["idle_lifetime_s"] = _median([c.lifetime for c in silent], cap)
        out["drip_lifetime_s"] = _median([c.lifetime for c in dripper.conns], cap)
        dripper.stop()
        for c in silent:
            c.close()
        # How many idle connections make a new request fail.
        held: list[Conn] = []
        out["idle_capacity"] = "none"
        while len(held) < idle:
            held += await hold_idle(host, int(port), 100)
            if not await probe(url):
                out["idle_capacity"] = str(len(held))
                break
        # Requests answered while the listener is flooded.
        held += await hold_idle(host, int(port), max(0, idle - len(held)))
        flood = Drip(host, int(port))
        await flood.start(drip)
        busy = await busy_requests(url, admin, agent, key, "busy-1", within=5.0)
        for name in ("admin_s", "pair_s", "longpoll_s"):
            v = getattr(busy, name)
            out[f"busy.{name[:-2]}_ms"] = "failed" if v is None else f"{v * 1000:.0f}"
        out["held_by_client"] = f"{len(held)} idle, {len(flood.conns)} drip"
        out["closed_by_server"] = (
            f"{sum(c.closed is not None for c in held)} idle, "
            f"{sum(c.closed is not None for c in flood.conns)} drip"
        )
        flood.stop()
        for c in held:
            c.close()
    finally:
        await admin.session.close()
    return out


def _count(path: Path, needle: bytes) -> int:
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(needle)  # a line cut at the chunk edge is missed: a lower bound
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.faults.listener", description=__doc__)
    ap.add_argument("--nofile", type=int, default=1024, help="the server's open-files limit")
    ap.add_argument("--config", type=Path, default=None, help="a segd config file")
    ap.add_argument("--cap", type=float, default=200.0, help="longest lifetime measured (s)")
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--drip", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    raise_own_nofile(args.idle + args.drip + 1000)
    with tempfile.TemporaryDirectory(prefix="segd-listener-") as tmp:
        server = ServerProcess(
            Path(tmp) / "data", Path(tmp) / "server.log", config=args.config, nofile=args.nofile
        )
        server.start()
        try:
            figures = asyncio.run(measure(server.url, server.token, args.cap, args.idle, args.drip))
            figures["emfile_log_lines"] = str(_count(server.log_path, b"Too many open files"))
            figures["server_log_bytes"] = str(server.log_path.stat().st_size)
        finally:
            server.stop()
    figures = {"nofile": str(args.nofile), **figures}
    width = max(len(k) for k in figures)
    for k, v in figures.items():
        print(f"{k.ljust(width)}  {v}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
