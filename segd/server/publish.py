"""From compiled instructions to signed, versioned, cached bytes per host.

`plan(hosts)` keeps those of the given hosts whose content (everything but
the version, told by `Compiler.host_digest`) changed, compiled at their next
version. The caller persists the new (version, digest) pairs, then
`commit(plan)` adopts them and wakes exactly those hosts; a host whose content
did not change keeps its version and is not woken. Instructions are encoded
and signed when first fetched, so a burst of changes costs one signature per
version actually read, and the signed JSON is kept for every later reader.
Those a caller is about to read (a pairing's answer) can be signed ahead with
`sign_ahead`, on another thread.

At start, `load(states)` compiles every host and bumps any whose content no
longer matches the digest last persisted (after an upgrade that compiles
differently, or a store restored from elsewhere), so an agent never holds stale
instructions under a current version number.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping

import msgspec
import nacl.signing

from segd import crypto, wire
from segd.server.compiler import Compiler
from segd.server.notify import Hub

_JSON = msgspec.json.Encoder()

Plan = dict[str, tuple[wire.Instructions, str]]  # host -> (instructions, content digest)


class Publisher:
    def __init__(self, key: nacl.signing.SigningKey, compiler: Compiler, hub: Hub) -> None:
        self._key = key
        self.key_id = crypto.key_id_of(key.verify_key)
        self.compiler = compiler
        self.hub = hub
        self._state: dict[str, tuple[int, str]] = {}  # host -> (version, digest)
        self._latest: dict[str, wire.Instructions] = {}
        self._signed: dict[str, bytes] = {}  # signed on first fetch

    def plan(self, hosts: Iterable[str]) -> Plan:
        """Of `hosts` (known ones only), those whose content changed, compiled."""
        out: Plan = {}
        for h in sorted(set(hosts)):
            state = self._state.get(h)
            if state is None:
                continue
            version, digest = state
            new_digest = self.compiler.host_digest(h)
            if new_digest != digest:
                out[h] = (self.compiler.compile_host(h, version + 1), new_digest)
        return out

    @staticmethod
    def versions(plan: Plan) -> dict[str, tuple[int, str]]:
        """What to persist for a plan: host -> (version, digest)."""
        return {h: (i.version, d) for h, (i, d) in plan.items()}

    def sign_ahead(self, plan: Plan, hosts: Iterable[str]) -> Signing | None:
        """Encode the planned instructions of `hosts` now, for signing elsewhere
        (the store's commit thread) before they are read."""
        payloads = {h: self.compiler.encode(plan[h][0]) for h in hosts if h in plan}
        return Signing(self._key, self.key_id, payloads) if payloads else None

    def commit(self, plan: Plan, signing: Signing | None = None) -> None:
        """Adopt the planned instructions (with those signed ahead), then wake
        their hosts."""
        ahead = signing.signed if signing is not None else {}
        for h, (instr, digest) in plan.items():
            self._state[h] = (instr.version, digest)
            self._latest[h] = instr
            if h in ahead:
                self._signed[h] = ahead[h]
            else:
                self._signed.pop(h, None)
        for h, (instr, _) in plan.items():
            self.hub.publish(h, instr.version)

    def load(self, states: Mapping[str, tuple[int, str]]) -> Plan:
        """Adopt persisted (version, digest) per host; return the hosts to bump."""
        self._state = dict(states)
        self._latest.clear()
        self._signed.clear()
        stale = self.plan(states)
        for h, (version, _) in self._state.items():
            if h not in stale:
                self._latest[h] = self.compiler.compile_host(h, version)
                self.hub.publish(h, version)
        return stale

    def add_host(self, host_id: str) -> None:
        """Track a new host at version 0 (its first plan makes version 1)."""
        self._state.setdefault(host_id, (0, ""))

    def drop_host(self, host_id: str) -> None:
        self._state.pop(host_id, None)
        self._latest.pop(host_id, None)
        self._signed.pop(host_id, None)

    def save_host(self, host_id: str) -> tuple[tuple[int, str], wire.Instructions] | None:
        if host_id not in self._state or host_id not in self._latest:
            return None
        return self._state[host_id], self._latest[host_id]

    def restore_host(
        self, host_id: str, saved: tuple[tuple[int, str], wire.Instructions] | None
    ) -> None:
        if saved is not None:
            self._state[host_id], self._latest[host_id] = saved

    def version(self, host_id: str) -> int:
        return self._state.get(host_id, (0, ""))[0]

    def signed(self, host_id: str) -> bytes | None:
        """The host's latest instructions, signed, as the JSON of a `SignedInstructions`
        (signed once per version, when first asked for)."""
        out = self._signed.get(host_id)
        if out is None:
            instr = self._latest.get(host_id)
            if instr is None:
                return None
            out = self._signed[host_id] = self._sign(instr)
        return out

    def _sign(self, instr: wire.Instructions) -> bytes:
        return signed_json(self._key, self.key_id, self.compiler.encode(instr))


class Signing:
    """Payloads encoded on the event loop, to be signed on another thread: the
    Ed25519 hashing, most of the cost, runs without the GIL."""

    def __init__(
        self, key: nacl.signing.SigningKey, key_id: str, payloads: dict[str, bytes]
    ) -> None:
        self._key = key
        self._key_id = key_id
        self._payloads = payloads
        self.signed: dict[str, bytes] = {}  # host -> signed JSON, once run

    def __call__(self) -> None:
        for h, payload in self._payloads.items():
            self.signed[h] = signed_json(self._key, self._key_id, payload)


def signed_json(key: nacl.signing.SigningKey, key_id: str, payload: bytes) -> bytes:
    """The JSON of a `SignedInstructions`, written around the base64url payload as
    bytes (its alphabet needs no escaping) to spare another pass over it."""
    sig = key.sign(payload).signature
    return b'{"key_id":%b,"payload":"%b","signature":"%b"}' % (
        _JSON.encode(key_id),
        _b64url(payload),
        _b64url(sig),
    )


def _b64url(data: bytes) -> bytes:
    """`crypto.b64e`, as bytes."""
    return base64.urlsafe_b64encode(data).rstrip(b"=")
