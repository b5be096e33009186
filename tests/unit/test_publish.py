"""The publisher: versions only for real changes, and signed JSON an agent accepts."""

from __future__ import annotations

import msgspec
import nacl.signing

from segd import crypto, wire
from segd.server.compiler import Compiler, encode_instructions
from segd.server.notify import Hub
from segd.server.publish import Publisher
from tests.unit.test_compiler import R_WEB_DB, wl


def publisher() -> tuple[Publisher, Compiler, nacl.signing.SigningKey]:
    key = nacl.signing.SigningKey.generate()
    c = Compiler([R_WEB_DB], [wl("w1", "A", "role=web", "10.0.0.1")])
    pub = Publisher(key, c, Hub())
    pub.commit(pub.load({"A": (0, ""), "B": (0, "")}))
    return pub, c, key


def test_signed_json_verifies_and_holds_the_committed_instructions() -> None:
    pub, c, key = publisher()
    raw = pub.signed("A")
    assert raw is not None
    signed = msgspec.json.decode(raw, type=wire.SignedInstructions)
    assert signed.key_id == crypto.key_id_of(key.verify_key)
    payload = crypto.b64d(signed.payload)
    assert crypto.verify(key.verify_key, payload, crypto.b64d(signed.signature))
    instr = msgspec.json.decode(payload, type=wire.Instructions)
    assert instr == c.compile_host("A", pub.version("A"))
    assert payload == encode_instructions(instr)
    assert pub.signed("A") is raw  # once per version


def test_only_hosts_whose_content_changed_get_a_version() -> None:
    pub, c, _ = publisher()
    before = {h: pub.version(h) for h in ("A", "B")}
    c.add_workload(wl("d1", "B", "role=db", "10.0.0.2"))
    plan = pub.plan({"A", "B"})
    assert set(plan) == {"A", "B"}
    pub.commit(plan)
    assert {h: pub.version(h) for h in ("A", "B")} == {h: v + 1 for h, v in before.items()}
    c.add_workload(wl("o1", "B", "role=other", "10.0.0.3"))
    assert set(pub.plan({"A", "B"})) == {"B"}  # A does not hold anything o1 joined
    c.remove_workload("o1")
    assert pub.plan({"A", "B"}) == {}  # back to what was published


def test_a_new_version_is_signed_anew() -> None:
    pub, c, _ = publisher()
    first = pub.signed("A")
    c.add_workload(wl("d1", "B", "role=db", "10.0.0.2"))
    pub.commit(pub.plan({"A"}))
    again = pub.signed("A")
    assert again != first
    signed = msgspec.json.decode(again or b"", type=wire.SignedInstructions)
    instr = msgspec.json.decode(crypto.b64d(signed.payload), type=wire.Instructions)
    assert instr.sets and ["10.0.0.2"] in instr.sets.values()


def test_instructions_signed_ahead_are_the_ones_served() -> None:
    pub, c, key = publisher()
    c.add_workload(wl("d1", "B", "role=db", "10.0.0.2"))
    plan = pub.plan({"A", "B"})
    signing = pub.sign_ahead(plan, {"B", "elsewhere"})
    assert signing is not None
    signing()  # as the commit thread would, once the transaction is durable
    pub.commit(plan, signing)
    assert pub.signed("B") == signing.signed["B"]
    assert set(signing.signed) == {"B"}
    for h in ("A", "B"):
        raw = pub.signed(h)
        signed = msgspec.json.decode(raw or b"", type=wire.SignedInstructions)
        payload = crypto.b64d(signed.payload)
        assert crypto.verify(key.verify_key, payload, crypto.b64d(signed.signature))
        assert msgspec.json.decode(payload, type=wire.Instructions) == c.compile_host(
            h, pub.version(h)
        )
