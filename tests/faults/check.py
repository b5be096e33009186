"""What a fault left behind: the store read back through the admin API, the hosts'
instructions fetched as their agents would, and the checks a storm must pass.

The contract after any fault, for a storm's attempts:

- answered 200 (acknowledged): the workload is stored, as answered;
- answered with a refusal (4xx) or an error (5xx): no workload for it;
- not answered (the connection broke): either, but only as it was sent;
- every stored workload is one that was sent; a key's `uses` equals the number of
  workloads paired with it and never exceeds `max_uses`;
- each stored workload has exactly one `workload.paired ok` audit row, each
  refusal its `denied` row, and no audit row names a container never sent;
- each host's instructions, as its agent fetches them, verify under the server
  key and equal a fresh compile of the stored rules and workloads, at a version
  no lower than any version the host was answered with before.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import nacl.signing

from segd import crypto, wire
from segd.server.compiler import Compiler
from tests.faults.load import AdminClient, LoadAgent, PairAttempt

INSTRUCTIONS_PATH = "/v1/agent/instructions"


@dataclasses.dataclass(frozen=True)
class StoreView:
    rules: list[wire.Rule]
    keys: list[wire.PairingKey]
    workloads: list[wire.Workload]
    audit: list[wire.AuditEntry]

    def workloads_by_container(self) -> dict[tuple[str, str], wire.Workload]:
        return {(w.host_id, w.container_id): w for w in self.workloads}


async def read_store(admin: AdminClient) -> StoreView:
    audit: list[wire.AuditEntry] = []
    after = 0
    while True:
        page = msgspec.convert(
            await admin.call("GET", f"/v1/audit?after={after}&limit=1000"), list[wire.AuditEntry]
        )
        audit += page
        if len(page) < 1000:
            break
        after = page[-1].id
    return StoreView(
        rules=msgspec.convert(await admin.call("GET", "/v1/rules"), list[wire.Rule]),
        keys=msgspec.convert(await admin.call("GET", "/v1/keys"), list[wire.PairingKey]),
        workloads=msgspec.convert(await admin.call("GET", "/v1/workloads"), list[wire.Workload]),
        audit=audit,
    )


def check_storm(view: StoreView, attempts: Iterable[PairAttempt]) -> dict[str, int]:
    """Assert the contract above for the storm's attempts; return counts by outcome."""
    sent = {(a.host_id, a.container_id): a for a in attempts}
    stored = view.workloads_by_container()
    outcome: collections.Counter[str] = collections.Counter()
    for key, a in sent.items():
        w = stored.get(key)
        if a.acknowledged:
            assert w is not None, f"acknowledged pairing {key} was lost"
            assert (w.id, w.ips, w.key_id) == (a.workload_id, [a.ip], a.key_id), (w, a)
            outcome["acknowledged"] += 1
        elif a.status is not None:
            assert w is None, f"pairing {key} answered {a.status} {a.error} is stored: {w}"
            outcome[f"refused:{a.error}"] += 1
        else:
            assert w is None or (w.ips, w.key_id) == ([a.ip], a.key_id), (w, a)
            outcome["lost, stored" if w else "lost, not stored"] += 1
    for key, w in stored.items():
        assert key in sent, f"stored workload {w.id} was never sent"

    per_key = collections.Counter(w.key_id for w in view.workloads)
    for k in view.keys:
        assert k.max_uses is None or k.uses <= k.max_uses, k
        assert k.uses == per_key.get(k.key_id, 0), (k, per_key.get(k.key_id, 0))

    paired = [e for e in view.audit if e.event == "workload.paired"]
    ok = collections.Counter(e.workload_id for e in paired if e.result == "ok")
    assert ok == collections.Counter(w.id for w in view.workloads)
    denied = {(e.host_id, e.container_id) for e in paired if e.result == "denied"}
    for key, a in sent.items():
        if a.status is not None and 400 <= a.status < 500:
            assert key in denied, f"refusal of {key} was not audited"
    assert {(e.host_id, e.container_id) for e in paired} <= set(sent)
    return dict(outcome)


async def fetch_instructions(
    session: aiohttp.ClientSession, url: str, agent: LoadAgent, verify_key: nacl.signing.VerifyKey
) -> wire.Instructions:
    """The host's current instructions, fetched as its agent does, signature checked."""
    path = f"{INSTRUCTIONS_PATH}?since=0&wait=0"
    headers = crypto.sign_request(agent.key, agent.host_id, "GET", path, b"", time.time())
    async with session.get(url.rstrip("/") + path, headers=headers) as r:
        body = await r.read()
        assert r.status == 200, (r.status, body)
    signed = msgspec.json.decode(body, type=wire.SignedInstructions)
    payload = crypto.b64d(signed.payload)
    assert crypto.verify(verify_key, payload, crypto.b64d(signed.signature))
    return msgspec.json.decode(payload, type=wire.Instructions)


async def check_convergence(
    session: aiohttp.ClientSession,
    url: str,
    agents: Iterable[LoadAgent],
    view: StoreView,
    verify_key: nacl.signing.VerifyKey,
    seen_versions: Mapping[str, int],
) -> dict[str, int]:
    """Every agent's instructions equal a fresh compile of the store, at a version
    no lower than the highest it was answered with; returns the versions."""
    fresh = Compiler(view.rules, view.workloads)
    out: dict[str, int] = {}
    for agent in agents:
        got = await fetch_instructions(session, url, agent, verify_key)
        assert got == fresh.compile_host(agent.host_id, got.version), agent.host_id
        assert got.version >= seen_versions.get(agent.host_id, 0), agent.host_id
        out[agent.host_id] = got.version
    return out


def server_verify_key(data_dir: Path) -> nacl.signing.VerifyKey:
    return nacl.signing.SigningKey((data_dir / "server.key").read_bytes()).verify_key


def highest_versions(attempts: Iterable[PairAttempt]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in attempts:
        if a.acknowledged:
            out[a.host_id] = max(out.get(a.host_id, 0), a.instructions_version)
    return out


def describe(counts: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
