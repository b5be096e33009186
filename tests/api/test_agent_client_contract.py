"""The agent's own client against a real server: the answers the server writes
from pre-encoded parts decode as the wire types, and verify."""

from __future__ import annotations

import aiohttp
import msgspec
import nacl.signing

from segd import crypto, wire
from segd.agent.client import ServerClient
from segd.server.compiler import encode_instructions
from tests.api.conftest import LiveServer
from tests.faults.load import AdminClient


async def test_agent_client_decodes_pairing_and_instructions(live_server: LiveServer) -> None:
    async with aiohttp.ClientSession() as session:
        admin = AdminClient(live_server.url, live_server.token, session)
        await admin.call(
            "POST",
            "/v1/rules",
            {
                "providers": [{"role": "db"}],
                "consumers": [{"role": "web"}],
                "services": ["tcp/5432"],
            },
        )
        await admin.call("POST", "/v1/profiles", {"name": "web", "labels": {"role": "web"}})
        token = (await admin.call("POST", "/v1/keys", {"profile": "web"}))["token"]
        code = (await admin.call("POST", "/v1/activation-codes", {}))["code"]

    client = ServerClient(live_server.url, nacl.signing.SigningKey.generate())
    try:
        reg = await client.register(code, "node-1")
        client.host_id = reg.host_id
        vk = crypto.verify_key_from_b64(next(iter(reg.server_keys.values())))
        res = await client.pair(
            wire.PairIn(container_id="c1", pairing_key=token, ips=["10.9.0.1"], name="w")
        )
        assert res.labels == {"role": "web"}
        assert res.instructions is None  # the long-poll brings them
        signed = await client.instructions(since=res.version - 1, wait=5)
        assert signed is not None
        payload = crypto.b64d(signed.payload)
        assert crypto.verify(vk, payload, crypto.b64d(signed.signature))
        instr = msgspec.json.decode(payload, type=wire.Instructions)
        assert instr.version == res.version
        assert [p.workload_id for p in instr.workloads] == [res.workload_id]
        assert payload == encode_instructions(instr)
        again = await client.instructions(since=0, wait=0)
        assert again == signed
        assert await client.instructions(since=instr.version, wait=0) is None
    finally:
        await client.close()


async def test_agent_client_reports_sidecars(live_server: LiveServer) -> None:
    async with aiohttp.ClientSession() as session:
        admin = AdminClient(live_server.url, live_server.token, session)
        await admin.call("POST", "/v1/profiles", {"name": "web", "labels": {"role": "web"}})
        token = (await admin.call("POST", "/v1/keys", {"profile": "web"}))["token"]
        code = (await admin.call("POST", "/v1/activation-codes", {}))["code"]
        client = ServerClient(live_server.url, nacl.signing.SigningKey.generate())
        try:
            client.host_id = (await client.register(code, "node-1")).host_id
            await client.pair(wire.PairIn(container_id="c1", pairing_key=token, ips=["10.9.0.1"]))
            await client.sidecars([wire.SidecarIn(container_id="c2", shares="c1", name="side")])
        finally:
            await client.close()
        [w] = await admin.call("GET", "/v1/workloads")
        assert w["sidecars"] == [{"container_id": "c2", "name": "side"}]


def test_agent_client_decodes_the_pairing_answer_of_an_earlier_server() -> None:
    """An answer carrying the signed instructions and no version still decodes."""
    signed = wire.SignedInstructions(key_id="k", payload="cA", signature="cw")
    old = msgspec.json.encode(
        {"workload_id": "w_1", "labels": {"role": "web"}, "instructions": signed}
    )
    res = msgspec.json.decode(old, type=wire.PairResult)
    assert (res.workload_id, res.version, res.instructions) == ("w_1", 0, signed)
    new = msgspec.json.encode(wire.PairResult(workload_id="w_1", labels={}, version=7))
    assert msgspec.json.decode(new) == {"workload_id": "w_1", "labels": {}, "version": 7}
