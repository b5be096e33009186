"""The agent end to end, in process and without root: containers start, stop and
restart on the fake engine, the real server pairs them, and what reaches the
fake kernel is checked table by table and connection by connection."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable

import structlog

from segd.wire import SignedInstructions
from tests.agent_inproc.conftest import World
from tests.agent_inproc.nft import accepts
from tests.orchestrator.fake_engine import FakeContainer

DB_PORT = 5432


async def _shop(world: World) -> tuple[str, str]:
    await world.rule({"role": "db"}, {"role": "web"}, f"tcp/{DB_PORT}")
    await world.start_agent()
    return await world.key({"role": "web"}), await world.key({"role": "db"})


async def test_start_pairs_and_enforces_the_policy(world: World) -> None:
    web_key, db_key = await _shop(world)
    web, db = world.run("web", key=web_key), world.run("db", key=db_key)
    await world.until(lambda: world.enforced(web) and world.enforced(db), "both enforced")
    intruder = world.run("intruder")
    await world.until(lambda: world.kind(intruder) == "isolated", "the intruder isolated")
    assert await world.workloads() == {web.id, db.id}
    k = world.kernel
    assert k.reachable(web, db, "tcp", DB_PORT)
    assert not k.reachable(web, db, "tcp", 80)
    assert not k.reachable(db, web, "tcp", 80)
    assert not k.reachable(intruder, db, "tcp", DB_PORT)
    # A container started after the first sync: its first table is written in place.
    assert k.netns(web).plans[0] == "isolation"


async def test_stop_withdraws_from_the_gate_and_unpairs(world: World) -> None:
    web_key, db_key = await _shop(world)
    web, db = world.run("web", key=web_key), world.run("db", key=db_key)
    await world.until(lambda: world.enforced(web) and world.enforced(db))
    ip = db.ip
    world.rm(db)
    await world.until(lambda: f". {ip}" not in (world.kernel.gate() or ""), "db out of the gate")
    await world.until(lambda: ip not in (world.kernel.table(web) or ""), "db out of web's set")
    assert await world.workloads() == {web.id}
    agent = world.agent
    assert agent is not None
    await world.until(lambda: not agent.host.enforced.get(db.id), "db's record gone")
    assert world.kernel.open_namespaces == 1  # db's namespace forgotten


async def test_restart_enforces_the_new_namespace(world: World) -> None:
    web_key, db_key = await _shop(world)
    web, db = world.run("web", key=web_key), world.run("db", key=db_key)
    await world.until(lambda: world.enforced(web) and world.enforced(db))
    old = world.kernel.netns(db)
    world.restart(db)
    assert world.kernel.netns(db) is not old
    await world.paired(web, db)  # unpaired when it died, paired again since it started
    assert world.kernel.reachable(web, db, "tcp", DB_PORT)
    # A namespace it saw being made: its first table is written in place, never replaced.
    assert not any(p.endswith("_replace") for p in world.kernel.netns(db).plans)


async def test_burst_of_containers_all_enforced_with_few_converges(world: World) -> None:
    web_key, db_key = await _shop(world)
    agent = world.agent
    assert agent is not None
    boxes = [world.run(f"c{i}", key=web_key if i % 2 else db_key) for i in range(20)]
    await world.until(lambda: all(world.enforced(c) for c in boxes), "all enforced", within=20)
    webs, dbs = boxes[1::2], boxes[0::2]
    assert all(world.kernel.reachable(w, d, "tcp", DB_PORT) for w in webs for d in dbs)
    assert not any(world.kernel.reachable(d, w, "tcp", DB_PORT) for w in webs for d in dbs)
    # Each namespace got its first table once and only then set changes: never a
    # whole table again for a version that only changed a set.
    for c in boxes:
        plans = world.kernel.netns(c).plans
        assert plans[:2] == ["isolation", "workload"], plans
        assert set(plans[2:]) <= {"set_delta"}, plans


async def test_instructions_change_touches_only_the_affected(world: World) -> None:
    web_key, db_key = await _shop(world)
    cache_key = await world.key({"role": "cache"})
    web, db, cache = (
        world.run("web", key=web_key),
        world.run("db", key=db_key),
        world.run("cache", key=cache_key),
    )
    await world.until(lambda: all(world.enforced(c) for c in (web, db, cache)))
    before = {c.id: list(world.kernel.netns(c).plans) for c in (web, db, cache)}
    rule = await world.rule({"role": "cache"}, {"role": "web"}, "tcp/6379")
    await world.until(lambda: world.kernel.reachable(web, cache, "tcp", 6379), "web -> cache")
    after = {c.id: world.kernel.netns(c).plans for c in (web, db, cache)}
    assert after[db.id] == before[db.id], "db's policy did not change: not touched"
    assert after[web.id][len(before[web.id]) :] == ["workload"]  # rewritten in place
    assert after[cache.id][len(before[cache.id]) :] == ["workload"]
    await world.api("DELETE", f"/v1/rules/{rule}")
    await world.until(lambda: not world.kernel.reachable(web, cache, "tcp", 6379), "rule gone")
    assert world.kernel.reachable(web, db, "tcp", DB_PORT)


async def test_versions_arriving_during_a_batch_are_applied_together(world: World) -> None:
    """Pairing answers bring versions while the kernel is busy: a container is
    brought to the newest, not through each in turn."""
    web_key, db_key = await _shop(world)
    web, db = world.run("web", key=web_key), world.run("db", key=db_key)
    await world.until(lambda: world.enforced(web) and world.enforced(db))
    agent = world.agent
    assert agent is not None
    world.kernel.pause()
    await world.rule({"role": "db"}, {"role": "web"}, "tcp/6001")
    await world.until(lambda: world.kernel.waiting, "a batch blocked in the kernel")
    before = len(world.kernel.netns(db).plans)
    version = agent.host.version
    more = [world.run("web2", key=web_key), world.run("web3", key=web_key)]
    await world.until(
        lambda: all(c.id in agent.host.workloads for c in more), "two pairings meanwhile"
    )
    assert agent.host.version > version
    world.kernel.resume()
    await world.until(lambda: all(world.enforced(c) for c in more), "both enforced")
    await world.until(lambda: all(world.kernel.reachable(c, db, "tcp", DB_PORT) for c in more))
    assert world.kernel.reachable(web, db, "tcp", 6001)
    # Three versions changed db's table; it was written at most twice (the write
    # under way, then the newest).
    assert len(world.kernel.netns(db).plans) - before <= 2


async def test_versions_published_while_the_kernel_is_busy_come_as_one(world: World) -> None:
    web_key, db_key = await _shop(world)
    web, db = world.run("web", key=web_key), world.run("db", key=db_key)
    await world.until(lambda: world.enforced(web) and world.enforced(db))
    agent = world.agent
    assert agent is not None
    with structlog.testing.capture_logs() as logs:
        world.kernel.pause()
        await world.rule({"role": "db"}, {"role": "web"}, "tcp/6001")
        await world.until(lambda: world.kernel.waiting, "a batch blocked in the kernel")
        first = agent.host.version
        await world.rule({"role": "db"}, {"role": "web"}, "tcp/6002")
        await world.rule({"role": "db"}, {"role": "web"}, "tcp/6003")
        world.kernel.resume()
        await world.until(lambda: world.kernel.reachable(web, db, "tcp", 6003), "the last rule")
    accepted = [e["version"] for e in logs if e["event"] == "instructions.accepted"]
    assert accepted == [first, first + 2]  # the one in between was never fetched
    assert world.kernel.reachable(web, db, "tcp", 6002)


async def test_flushed_table_and_deleted_gate_are_repaired(world: World) -> None:
    web_key, db_key = await _shop(world)
    web, db = world.run("web", key=web_key), world.run("db", key=db_key)
    await world.until(lambda: world.enforced(web) and world.enforced(db))
    world.kernel.netns(db).ruleset.run("delete table inet segd\n")  # from inside, CAP_NET_ADMIN
    world.kernel.host.ruleset.run("delete table bridge segd_gate\n")
    assert world.kernel.table(db) is None and world.kernel.gate() is None  # open, for now
    await world.reconcile()
    assert world.enforced(db) and world.enforced(web)
    db_table = world.kernel.netns(db).ruleset.tables["inet segd"]
    assert accepts(db_table, "input", web.ip, "tcp", DB_PORT)
    assert not accepts(db_table, "input", web.ip, "tcp", 80)
    assert world.kernel.reachable(web, db, "tcp", DB_PORT)
    assert world.kernel.netns(db).plans[-1] == "workload_replace"  # not patched: replaced

    async def audited() -> list[str]:
        audit = await world.api("GET", "/v1/audit?limit=100")
        return sorted(e["detail"] for e in audit if e["event"] == "agent.tamper")

    await world.until(lambda: _eq(audited(), TAMPERED), "both reported")


TAMPERED = ["host gate table missing; rebuilt", "namespace table changed outside segd; repaired"]


async def _eq(got: Awaitable[object], want: object) -> bool:
    return await got == want


async def test_server_down_keeps_enforcing_and_pairs_when_back(world: World) -> None:
    web_key, db_key = await _shop(world)
    late_key = await world.key({"role": "web"})
    web, db = world.run("web", key=web_key), world.run("db", key=db_key)
    await world.until(lambda: world.enforced(web) and world.enforced(db))
    await world.stop_server()
    late = world.run("late", key=late_key)
    await world.until(lambda: world.kind(late) == "isolated", "late isolated while away")
    agent = world.agent
    assert agent is not None
    await world.until(lambda: late.id in agent.link.pairing, "its pairing retried meanwhile")
    assert world.kind(late) == "isolated" and world.kernel.reachable(web, db, "tcp", DB_PORT)
    assert not world.kernel.reachable(late, db, "tcp", DB_PORT)
    await world.start_server()
    await world.until(lambda: world.enforced(late), "late paired once the server is back")
    await world.until(lambda: world.kernel.reachable(late, db, "tcp", DB_PORT), "late -> db")


async def test_restarted_agent_enforces_from_disk_and_replaces_what_it_does_not_know(
    world: World,
) -> None:
    web_key, db_key = await _shop(world)
    web, db = world.run("web", key=web_key), world.run("db", key=db_key)
    await world.until(lambda: world.enforced(web) and world.enforced(db))
    await world.stop_agent()
    await world.stop_server()
    gone_ip = db.ip
    world.rm(db)
    await world.start_agent()
    # From its last instructions on disk; the dead db leaves the gate at once.
    assert world.enforced(web)
    assert f". {gone_ip}" not in (world.kernel.gate() or "")
    assert world.kernel.netns(web).plans[-1] == "workload_replace"
    await world.start_server()
    await world.paired(web)  # the dead db unpaired once the server is back


async def _revoked_db(world: World) -> tuple[FakeContainer, FakeContainer]:
    """web and db paired; db's key then revoked without unpairing (running
    workloads stay paired): (web, db)."""
    web_key, db_key = await _shop(world)
    web, db = world.run("web", key=web_key), world.run("db", key=db_key)
    await world.paired(web, db)
    for k in await world.api("GET", "/v1/keys"):
        if k["profile"] == "p1":  # db's
            await world.api("POST", f"/v1/keys/{k['key_id']}/revoke", {"unpair": False})
    assert await world.workloads() == {web.id, db.id}
    return web, db


async def _stopped_by_its_key(world: World, web: FakeContainer, db: FakeContainer) -> None:
    await world.until(lambda: world.kind(db) == "isolated", "db isolated", within=10)
    assert await world.workloads() == {web.id}
    assert not world.kernel.reachable(web, db, "tcp", DB_PORT)
    assert world.kind(web) == "workload"  # it did not restart: its workload stays


async def test_a_restart_the_agent_did_not_see_checks_the_key_again(world: World) -> None:
    """dockerd restarted the container while its event stream was down: the
    resync finds it in a new namespace. As after a live restart, it is unpaired
    and paired again, so a key revoked meanwhile (without unpairing) stops it."""
    web, db = await _revoked_db(world)
    await world.engine.stop()  # the event stream goes: db's die and start are missed
    world.restart(db)
    await world.engine.start(world.socket)
    await _stopped_by_its_key(world, web, db)


async def test_a_restart_while_the_agent_was_stopped_checks_the_key_again(world: World) -> None:
    """A restart the agent missed because it was stopped (or the host rebooted):
    the namespace holds no table of the agent's, so the container is paired
    again, and its revoked key stops it."""
    web, db = await _revoked_db(world)
    await world.stop_agent()
    world.restart(db)
    await world.start_agent()
    await _stopped_by_its_key(world, web, db)


async def test_docker_going_away_and_back_resyncs(world: World) -> None:
    web_key, db_key = await _shop(world)
    web = world.run("web", key=web_key)
    await world.until(lambda: world.enforced(web))
    await world.engine.stop()
    db = world.run("db", key=db_key)  # started while the stream is down
    await world.engine.start(world.socket)
    await world.until(lambda: world.enforced(db), "db found by the resync", within=10)
    assert world.kernel.reachable(web, db, "tcp", DB_PORT)
    # Not seen being made: its namespace was not known clean.
    assert world.kernel.netns(db).plans[0] == "isolation_replace"


async def test_sidecar_is_not_enforced_and_keeps_its_owners_table(world: World) -> None:
    web_key, db_key = await _shop(world)
    web, db = world.run("web", key=web_key), world.run("db", key=db_key)
    await world.until(lambda: world.enforced(web) and world.enforced(db))
    table = world.kernel.table(db)
    side = world.run("side", key=web_key, mode=f"container:{db.id}")
    await world.until(lambda: world.info(side) is not None, "the sidecar seen")
    await world.reconcile()
    assert world.kernel.table(db) == table
    assert world.kind(side) is None and side.id not in await world.workloads()


async def test_container_started_while_docker_lists_is_not_taken_for_gone(world: World) -> None:
    """A full reconcile lists what runs, then compares: a container that started
    after the listing was taken is not in it, yet it is running."""
    web_key, db_key = await _shop(world)
    web = world.run("web", key=web_key)
    await world.until(lambda: world.enforced(web))
    world.engine.hold_list = asyncio.Event()
    reconcile = asyncio.create_task(world.reconcile())
    await world.until(lambda: world.engine.held, "Docker listing, slowly")
    db = world.run("db", key=db_key)
    await world.paired(web, db)
    world.engine.hold_list.set()
    await reconcile
    await world.paired(web, db)
    assert world.kernel.reachable(web, db, "tcp", DB_PORT)


async def test_container_died_while_docker_lists_is_not_seen_again(world: World) -> None:
    """The listing said it runs; it died before the agent read the listing."""
    web_key, db_key = await _shop(world)
    web, db = world.run("web", key=web_key), world.run("db", key=db_key)
    await world.paired(web, db)
    world.engine.hold_inspect[db.id] = hold = asyncio.Event()
    reconcile = asyncio.create_task(world.reconcile())
    await world.until(lambda: world.engine.held, "Docker inspecting db, slowly")
    world.rm(db)
    agent = world.agent
    assert agent is not None
    await world.until(lambda: db.id not in agent.host.containers, "db's death seen")
    hold.set()
    await reconcile
    assert db.id not in agent.host.containers and db.id not in agent.host.enforced
    await world.paired(web)


async def test_instructions_are_on_disk_before_they_are_enforced(world: World) -> None:
    """A write that fails is tried again by the periodic round, and an agent
    restarted without the server never goes back to older instructions: an
    admin's unpairing stays."""
    web_key, db_key = await _shop(world)
    agent = world.agent
    assert agent is not None
    web, db = world.run("web", key=web_key), world.run("db", key=db_key)
    await world.paired(web, db)
    real = agent.state.save_instructions
    writes: list[int] = []

    def failing_once(signed: SignedInstructions) -> None:
        writes.append(1)
        if len(writes) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(signed)

    agent.state.save_instructions = failing_once  # type: ignore[method-assign]
    (wid,) = [
        w["id"] for w in await world.api("GET", "/v1/workloads") if w["container_id"] == db.id
    ]
    await world.api("DELETE", f"/v1/workloads/{wid}")  # an admin unpairs db
    await world.until(lambda: world.kind(db) == "isolated", "db isolated")
    enforced = agent.host.version
    assert writes == [1] and agent._saved_version < enforced  # its write failed
    await agent.round()  # the periodic round writes it again
    assert writes == [1, 1] and agent._saved_version == enforced
    await world.stop_agent()
    await world.stop_server()  # out of reach when the agent comes back
    back = await world.start_agent()
    assert back.host.version == enforced
    await world.until(lambda: world.kind(db) == "isolated", "db isolated again")
    assert not world.kernel.reachable(web, db, "tcp", DB_PORT)
