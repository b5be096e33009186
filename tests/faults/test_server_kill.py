"""`segd server` killed with SIGKILL in the middle of a pairing storm, then restarted
on the same data dir: nothing acknowledged is lost, nothing refused is kept, no key
is used beyond its max (across the crash too), the audit matches, and every
agent's instructions equal a fresh compile of what was kept."""

from __future__ import annotations

import random
from pathlib import Path

import aiohttp
import pytest

from tests.faults.check import (
    check_convergence,
    check_storm,
    describe,
    highest_versions,
    read_store,
    server_verify_key,
)
from tests.faults.conftest import MakeServer
from tests.faults.load import (
    AdminClient,
    LoadAgent,
    PairAttempt,
    StormResult,
    issue_keys,
    pair_storm,
    register_agents,
)
from tests.faults.proc import ServerProcess

WEB_TO_WEB = {
    "providers": [{"role": "web"}],
    "consumers": [{"role": "web"}],
    "services": ["tcp/80"],
}


async def _storm_and_kill(
    server: ServerProcess,
    agents: list[LoadAgent],
    tokens: list[str],
    *,
    n: int,
    first: int,
    concurrency: int,
    kill_after: int,
) -> StormResult:
    """Storm the server and SIGKILL it once `kill_after` attempts were answered."""
    answered = 0

    def on_attempt(a: PairAttempt) -> None:
        nonlocal answered
        answered += a.status is not None
        if answered == kill_after:
            server.kill()

    return await pair_storm(
        server.url,
        agents,
        n,
        concurrency,
        tokens=tokens,
        first_index=first,
        read_versions=True,
        on_attempt=on_attempt,
        timeout=15,
    )


async def _kill_restart_rounds(
    make_server: MakeServer,
    *,
    hosts: int,
    keys: int,
    max_uses: int,
    per_round: int,
    rounds: int,
    concurrency: int,
    seed: int,
) -> None:
    rnd = random.Random(seed)
    server = make_server()
    server.start()
    data_dir: Path = server.data_dir
    async with aiohttp.ClientSession() as session:
        admin = AdminClient(server.url, server.token, session)
        await admin.call("POST", "/v1/rules", WEB_TO_WEB)
        agents = await register_agents(server.url, admin, hosts)
        tokens = await issue_keys(
            admin, "web", {"role": "web", "app": "shop"}, keys=keys, max_uses=max_uses
        )
        vk = server_verify_key(data_dir)
        attempts: list[PairAttempt] = []
        versions: dict[str, int] = {}
        for r in range(rounds):
            kill_after = rnd.randrange(per_round // 20, per_round // 5)
            result = await _storm_and_kill(
                server,
                agents,
                tokens,
                n=per_round,
                first=r * per_round,
                concurrency=concurrency,
                kill_after=kill_after,
            )
            attempts += result.attempts
            assert server.popen is not None and server.popen.returncode == -9
            lost = [a for a in result.attempts if a.status is None]
            assert lost, "the kill came after the storm"

            server.start()  # same data dir, same port
            view = await read_store(admin)
            counts = check_storm(view, attempts)
            print(f"round {r}: killed after {kill_after} answers; {describe(counts)}")
            for h, v in highest_versions(result.attempts).items():
                versions[h] = max(versions.get(h, 0), v)
            versions = await check_convergence(session, server.url, agents, view, vk, versions)

        # After the crashes, a storm that runs to the end uses every key exactly up.
        final = await pair_storm(
            server.url,
            agents,
            keys * max_uses * 2,
            concurrency,
            tokens=tokens,
            first_index=rounds * per_round,
            read_versions=True,
        )
        assert all(a.status is not None and a.status < 500 for a in final.attempts)
        attempts += final.attempts
        view = await read_store(admin)
        check_storm(view, attempts)
        assert [k.uses for k in view.keys] == [max_uses] * keys
        assert len(view.workloads) == keys * max_uses
        for h, v in highest_versions(final.attempts).items():
            versions[h] = max(versions.get(h, 0), v)
        await check_convergence(session, server.url, agents, view, vk, versions)
    assert server.terminate() == 0


async def test_sigkill_during_pairing_storm_loses_nothing_acknowledged(
    make_server: MakeServer,
) -> None:
    await _kill_restart_rounds(
        make_server,
        hosts=6,
        keys=60,
        max_uses=3,
        per_round=600,
        rounds=2,
        concurrency=64,
        seed=1,
    )


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3])
async def test_sigkill_repeatedly_during_big_pairing_storms(
    make_server: MakeServer, seed: int
) -> None:
    await _kill_restart_rounds(
        make_server,
        hosts=16,
        keys=200,
        max_uses=10,
        per_round=3000,
        rounds=5,
        concurrency=200,
        seed=seed,
    )
