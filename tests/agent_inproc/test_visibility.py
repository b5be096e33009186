"""What the agent reports: packets its containers' tables logged become flow
records sent in batches, and its metrics are served on a loopback listener."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from segd.agent.agent import Agent
from segd.agent.client import Denied, ServerUnavailable
from segd.agent.flows import Directory
from segd.agent.metrics import AgentMetrics
from segd.agent.reporter import Dump, FlowReporter
from segd.firewall.conntrack import CtEntry
from segd.firewall.nflog import GATE_LOG_KEY, LogPacket
from segd.wire import FlowBatchIn
from tests.agent_inproc.conftest import World, _free_port
from tests.orchestrator.fake_engine import FakeContainer

DB_PORT = 5432


class Capture:
    """Stands in for the server's flow ingest: keeps what the agent sends, or fails."""

    def __init__(self, agent: Agent) -> None:
        self.batches: list[FlowBatchIn] = []
        self.fail: Exception | None = None
        agent.client.flows = self  # type: ignore[method-assign]

    async def __call__(self, batch: FlowBatchIn) -> None:
        if self.fail is not None:
            raise self.fail
        self.batches.append(batch)


async def shop(world: World, **cfg: object) -> tuple[Agent, FakeContainer, FakeContainer]:
    await world.rule({"role": "db"}, {"role": "web"}, f"tcp/{DB_PORT}")
    agent = await world.start_agent(**cfg)
    web_key, db_key = await world.key({"role": "web"}), await world.key({"role": "db"})
    web, db = world.run("web", key=web_key), world.run("db", key=db_key)
    await world.paired(web, db)
    return agent, web, db


def blocked(src: FakeContainer, dst: FakeContainer, port: int, n: int = 1) -> list[LogPacket]:
    return [LogPacket("segd:in:b", src.ip, dst.ip, "tcp", 40000 + i, port, 60) for i in range(n)]


async def scrape(listen: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as s, s.get(f"http://{listen}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_logged_packets_become_flow_records_and_metrics_are_scraped(world: World) -> None:
    listen = f"127.0.0.1:{_free_port()}"
    agent, web, db = await shop(world, metrics_listen=listen)
    sent = Capture(agent)
    ids = {w["container_id"]: w["id"] for w in await world.api("GET", "/v1/workloads")}
    agent.reporter.on_log(db.id, blocked(web, db, 80, n=3), 0)
    agent.reporter.on_log(
        web.id, [LogPacket("segd:out:a:r", web.ip, db.ip, "tcp", 40000, DB_PORT, 60)], 0
    )
    await agent.reporter.flush()
    (batch,) = sent.batches
    assert batch.lost == 0
    by_dir = {r.direction: r for r in batch.records}
    inbound, outbound = by_dir["in"], by_dir["out"]
    assert (inbound.container_id, inbound.workload_id, inbound.peer_workload_id) == (
        db.id,
        ids[db.id],
        ids[web.id],
    )
    assert (inbound.verdict, inbound.port, inbound.connections, inbound.packets) == (
        "blocked",
        80,
        3,
        3,
    )
    assert (outbound.verdict, outbound.rule_id, outbound.peer_workload_id) == (
        "allowed",
        "r",
        ids[db.id],
    )

    m = await scrape(listen)
    assert m[("segd_agent_containers", (("state", "workload"),))] == 2
    assert m[("segd_agent_gate_entries", ())] == 2
    assert m[("segd_agent_policy_drops_total", (("direction", "in"),))] == 3
    assert m[("segd_agent_policy_drops_total", (("direction", "out"),))] == 0
    assert m[("segd_agent_flow_records_sent_total", ())] == 2
    assert m[("segd_agent_flow_records_lost_total", ())] == 0
    assert m[("segd_agent_ruleset_apply_seconds_count", ())] >= 2
    assert m[("segd_agent_apply_failures_total", (("op", "apply"),))] == 0
    assert m[("segd_agent_docker_events_total", (("event", "ContainerStarted"),))] >= 2


async def test_an_unreachable_server_keeps_batches_and_a_refusing_one_loses_them(
    world: World,
) -> None:
    agent, web, db = await shop(world)
    sent = Capture(agent)
    sent.fail = ServerUnavailable("down")
    agent.reporter.on_log(db.id, blocked(web, db, 80), 0)
    await agent.reporter.flush()
    assert agent.reporter.flows.queued == 1 and sent.batches == []
    sent.fail = Denied(400, "invalid_input", "no")
    agent.reporter.on_log(db.id, blocked(web, db, 81), 2)  # and two reader overruns
    await agent.reporter.flush()
    assert agent.reporter.flows.queued == 0
    assert agent.metrics.flow_records_lost._value.get() == 4  # two records, two overruns
    sent.fail = None
    await agent.reporter.flush()
    (batch,) = sent.batches
    assert batch.records == [] and batch.lost == 4  # never silently dropped


async def test_a_flood_of_denied_packets_is_aggregated_and_the_agent_keeps_enforcing(
    world: World,
) -> None:
    agent, web, db = await shop(world)
    sent = Capture(agent)
    intruder = world.run("intruder")
    await world.until(lambda: world.kind(intruder) == "isolated")
    for _ in range(50_000 // 250):  # as the reader hands them over, from the loop
        agent.reporter.on_log(db.id, blocked(intruder, db, DB_PORT, n=250), 0)
    cache = world.run("cache", key=await world.key({"role": "cache"}))
    await world.paired(web, db, cache)  # a pairing on the host still enforces
    await agent.reporter.flush()
    (batch,) = sent.batches
    (record,) = batch.records
    assert (record.packets, record.peer_ip, record.container_id) == (50_000, intruder.ip, db.id)
    assert record.peer_workload_id == ""  # the intruder is not a workload


async def test_the_gates_drops_are_attributed_to_the_container_by_its_address(
    world: World,
) -> None:
    agent, _web, db = await shop(world)
    sent = Capture(agent)
    intruder = world.run("intruder")
    await world.until(lambda: world.kind(intruder) == "isolated")
    agent.reporter.on_log(
        GATE_LOG_KEY,
        [
            LogPacket("segd:out:b", intruder.ip, db.ip, "tcp", 40000, DB_PORT, 60),
            LogPacket("segd:in:b", "172.17.0.1", intruder.ip, "tcp", 40000, 22, 60),
            LogPacket("segd:out:b", "10.99.0.1", db.ip, "tcp", 40000, DB_PORT, 60),  # nobody's
        ],
        0,
    )
    await agent.reporter.flush()
    (batch,) = sent.batches
    got = {(r.container_id, r.direction, r.peer_ip, r.port) for r in batch.records}
    assert got == {(intruder.id, "out", db.ip, DB_PORT), (intruder.id, "in", "172.17.0.1", 22)}


class FakeClient:
    """The server's flow ingest, down for the first `down` calls."""

    def __init__(self, down: int = 0) -> None:
        self.down = down
        self.calls = 0
        self.batches: list[FlowBatchIn] = []

    async def flows(self, batch: FlowBatchIn) -> None:
        self.calls += 1
        if self.calls <= self.down:
            raise ServerUnavailable("down")
        self.batches.append(batch)


async def test_each_interval_is_sent_and_an_unreachable_server_is_retried_meanwhile() -> None:
    client = FakeClient(down=3)
    reporter = FlowReporter(
        client,  # type: ignore[arg-type]
        lambda: Directory({}, {}),
        AgentMetrics(),
        interval=0.2,
        backoff_max=0.02,
    )
    task = asyncio.create_task(reporter.run())
    try:
        reporter.on_log("db", [LogPacket("segd:in:b", "10.0.0.1", "10.0.0.2", "udp", 1, 53, 40)], 0)
        for _ in range(500):
            if client.batches:
                break
            await asyncio.sleep(0.02)
        (batch,) = client.batches  # sent within the interval it closed in, after retries
        assert client.calls == 4 and [r.port for r in batch.records] == [53]
        reporter.on_log("db", [LogPacket("segd:in:b", "10.0.0.1", "10.0.0.2", "udp", 1, 54, 40)], 0)
        for _ in range(500):
            if len(client.batches) == 2:
                break
            await asyncio.sleep(0.02)
        assert [r.port for r in client.batches[1].records] == [54]  # the next interval
    finally:
        task.cancel()


def counting(client: FakeClient, dump: Dump, db_ip: str) -> FlowReporter:
    """A reporter whose container `db` (at `db_ip`) has its connections counted."""
    directory = Directory({"db": "w_db"}, {}, {"db": frozenset({db_ip})})
    return FlowReporter(
        client,  # type: ignore[arg-type]
        lambda: directory,
        AgentMetrics(),
        interval=60,
        backoff_max=0.02,
        dump=dump,
    )


async def test_enhanced_connections_are_sent_with_their_bytes_ended_or_still_open() -> None:
    """A counted container: a connection that ended (from the kernel's callback)
    and one still open (from the dump at the interval's close) both reach the
    server with conntrack's counts; a failing dump leaves the interval to go."""
    client = FakeClient()
    dumps: list[Mapping[str, list[CtEntry]] | None] = [
        {"db": [CtEntry(2, "tcp", "10.0.0.1", "10.0.0.2", 40001, 5432, 8, 4_000, False)]},
        None,  # the dump fails
    ]

    async def dump() -> Mapping[str, list[CtEntry]]:
        found = dumps.pop(0)
        if found is None:
            raise OSError("netlink went away")
        return found

    reporter = counting(client, dump, "10.0.0.2")
    reporter.on_log(
        "db", [LogPacket("segd:in:a:r1", "10.0.0.1", "10.0.0.2", "tcp", 40000, 5432, 60)], 0
    )
    reporter.on_count(
        "db", [CtEntry(1, "tcp", "10.0.0.1", "10.0.0.2", 40000, 5432, 12, 9_000, True)], 0
    )
    await reporter.flush()
    (batch,) = client.batches
    got = {r.rule_id: (r.connections, r.packets, r.bytes) for r in batch.records}
    # the logged one under its rule; the one opened before any log, allowed with no rule
    assert got == {"r1": (1, 12, 9_000), "": (1, 8, 4_000)}
    await reporter.flush()  # the dump fails: logged, nothing else
    assert len(client.batches) == 1


async def test_a_connection_that_ends_while_the_dump_runs_is_sent_once() -> None:
    """The dump runs off the loop while the kernel's callbacks go on: the end of a
    connection read meanwhile is not undone by the dump's older snapshot."""
    client = FakeClient()
    web, db = "10.0.0.1", "10.0.0.2"
    reporter: FlowReporter

    async def dump() -> Mapping[str, list[CtEntry]]:
        snapshot = {"db": [CtEntry(7, "tcp", web, db, 40000, 5432, 10, 1_000, False)]}
        ended = [CtEntry(7, "tcp", web, db, 40000, 5432, 12, 1_200, True)]
        asyncio.get_running_loop().call_soon(reporter.on_count, "db", ended, 0)
        await asyncio.sleep(0)  # the loop reads the connection's end meanwhile
        return snapshot

    reporter = counting(client, dump, db)
    reporter.on_log("db", [LogPacket("segd:in:a:r1", web, db, "tcp", 40000, 5432, 60)], 0)
    await reporter.flush()
    (batch,) = client.batches
    got = {r.rule_id: (r.connections, r.packets, r.bytes) for r in batch.records}
    assert got == {"r1": (1, 12, 1_200)}
