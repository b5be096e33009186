"""The publisher: versions are generations, given only for real changes, and signed
JSON an agent accepts, signed once per version."""

from __future__ import annotations

import asyncio

import msgspec
import nacl.signing

from segd import crypto, wire
from segd.server.compiler import Compiler, encode_instructions
from segd.server.publish import Publisher
from tests.unit.test_compiler import R_WEB_DB, compiler, wl


def publisher() -> tuple[Publisher, Compiler, nacl.signing.SigningKey]:
    key = nacl.signing.SigningKey.generate()
    c = compiler([R_WEB_DB], [wl("w1", "A", "role=web", "10.0.0.1")])
    pub = Publisher(key, c)
    stale = pub.load({"A": (0, ""), "B": (0, "")})
    assert stale == ["A", "B"]  # nothing persisted matches
    assert set(pub.publish(stale, 1)) == {"A", "B"}
    return pub, c, key


def _open(raw: bytes | None, key: nacl.signing.SigningKey) -> wire.Instructions:
    signed = msgspec.json.decode(raw or b"", type=wire.SignedInstructions)
    assert signed.key_id == crypto.key_id_of(key.verify_key)
    payload = crypto.b64d(signed.payload)
    assert crypto.verify(key.verify_key, payload, crypto.b64d(signed.signature))
    instr = msgspec.json.decode(payload, type=wire.Instructions)
    assert payload == encode_instructions(instr)
    return instr


def test_signed_json_verifies_and_holds_the_current_instructions() -> None:
    pub, c, key = publisher()
    raw = pub.signed("A")
    assert _open(raw, key) == c.compile_host("A", 1)
    assert pub.signed("A") is raw  # once per version
    assert pub.signed("unknown") is None


def test_only_hosts_whose_content_changed_get_the_generation() -> None:
    pub, c, _ = publisher()
    c.add_workload(wl("d1", "B", "role=db", "10.0.0.2"))
    assert pub.publish({"A", "B"}, 2) == {
        "A": (2, c.host_digest("A")),
        "B": (2, c.host_digest("B")),
    }
    c.add_workload(wl("o1", "B", "role=other", "10.0.0.3"))
    assert set(pub.publish({"A", "B"}, 3)) == {"B"}  # A holds nothing o1 joined
    assert (pub.version("A"), pub.version("B")) == (2, 3)
    c.remove_workload("o1")
    c.add_workload(wl("o1", "B", "role=other", "10.0.0.3"))
    assert pub.publish({"A", "B"}, 4) == {}  # back to what was published
    assert pub.publish({"nobody"}, 5) == {}


def test_a_new_version_is_signed_anew() -> None:
    pub, c, key = publisher()
    first = pub.signed("A")
    c.add_workload(wl("d1", "B", "role=db", "10.0.0.2"))
    pub.publish({"A"}, 7)
    again = pub.signed("A")
    assert again != first
    instr = _open(again, key)
    assert instr.version == 7 and ["10.0.0.2"] in instr.sets.values()


def test_load_keeps_versions_whose_content_matches() -> None:
    _, c, _ = publisher()
    persisted = {"A": (5, c.host_digest("A")), "B": (6, "stale")}
    again = Publisher(nacl.signing.SigningKey.generate(), c)
    assert again.load(persisted) == ["B"]
    assert (again.version("A"), again.version("B")) == (5, 6)


async def test_only_changed_hosts_are_woken() -> None:
    pub, c, key = publisher()
    wait_a = asyncio.create_task(pub.newer("A", 1, 5.0))
    wait_other = asyncio.create_task(pub.newer("C", 0, 0.2))
    await asyncio.sleep(0.01)
    c.add_workload(wl("d1", "B", "role=db", "10.0.0.2"))
    pub.publish({"A"}, 2)
    assert _open(await asyncio.wait_for(wait_a, 1), key).version == 2
    assert await wait_other is None
    assert await pub.newer("A", 2, 0) is None
