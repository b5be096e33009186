"""SIGTERM in the middle of a pairing storm, with agents parked in long-polls: the
server stops accepting, answers what it was handling (the long-polls at once, with
204), and exits 0 within a bound. Nothing it handled goes unanswered."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import msgspec

from segd import crypto, wire
from tests.faults.check import check_storm, describe, read_store
from tests.faults.conftest import MakeServer
from tests.faults.load import (
    AdminClient,
    PairAttempt,
    agent_get,
    issue_keys,
    pair_storm,
    register_agents,
)

WEB_TO_WEB = {
    "providers": [{"role": "web"}],
    "consumers": [{"role": "web"}],
    "services": ["tcp/80"],
}
EXIT_BOUND_S = 12.0
RELEASE_BOUND_S = 3.0


async def test_sigterm_drains_in_flight_requests_and_exits_in_time(
    make_server: MakeServer,
) -> None:
    server = make_server()
    server.start()
    async with aiohttp.ClientSession() as session:
        admin = AdminClient(server.url, server.token, session)
        await admin.call("POST", "/v1/rules", WEB_TO_WEB)
        agents = await register_agents(server.url, admin, 8)
        pairing, idle = agents[:4], agents[4:]
        tokens = await issue_keys(admin, "web", {"role": "web"}, keys=4, max_uses=100_000)

        # Hosts without workloads: no pairing changes their instructions, so their
        # long-polls stay parked until the server lets them go.
        async def park(agent_index: int) -> tuple[int, float]:
            a = idle[agent_index]
            status, body = await agent_get(session, server.url, a, "/v1/agent/instructions")
            assert status == 200
            signed = msgspec.json.decode(body, type=wire.SignedInstructions)
            version = msgspec.json.decode(crypto.b64d(signed.payload), type=wire.Instructions)
            path = f"/v1/agent/instructions?since={version.version}&wait=30"
            status, _ = await agent_get(session, server.url, a, path)
            return status, time.monotonic()

        polls = [asyncio.create_task(park(i)) for i in range(len(idle))]
        await asyncio.sleep(0.5)
        assert not any(p.done() for p in polls)

        term_at = 0.0
        answered = 0

        def on_attempt(a: PairAttempt) -> None:
            nonlocal term_at, answered
            answered += a.status is not None
            if answered == 150:
                assert server.popen is not None
                server.popen.send_signal(signal.SIGTERM)
                term_at = time.monotonic()

        result = await pair_storm(
            server.url, pairing, 3000, 16, tokens=tokens, on_attempt=on_attempt, timeout=20
        )
        released = await asyncio.gather(*polls)
        assert server.popen is not None
        rc = await asyncio.to_thread(server.popen.wait, EXIT_BOUND_S + 5)
        exited_after = time.monotonic() - term_at

        assert term_at > 0
        assert rc == 0, server.log_tail()
        assert exited_after < EXIT_BOUND_S, exited_after
        for status, at in released:
            assert status == 204 and at - term_at < RELEASE_BOUND_S, (status, at - term_at)
        statuses = {a.status for a in result.attempts}
        assert statuses <= {200, 503, None}, statuses  # 503: came in while stopping
        assert None in statuses  # the storm did outlive the server

        server.start()
        view = await read_store(admin)
        counts = check_storm(view, result.attempts)
        print(f"stopped {exited_after:.2f}s after SIGTERM; {describe(counts)}")
        # Drained: whatever the server handled, it answered. A request it never
        # answered left no trace, not even an audit row.
        assert "lost, stored" not in counts
        lost = {(a.host_id, a.container_id) for a in result.attempts if a.status is None}
        assert not lost & {(e.host_id, e.container_id) for e in view.audit}
    assert server.terminate() == 0
    assert '"event": "server.closed"' in server.log_tail(100_000)
