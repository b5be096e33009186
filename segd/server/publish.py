"""The one owner of instruction versions: from compiled content to signed bytes per host.

A host's version is the generation of the last commit that changed its
content (everything but the version, told by `Compiler.host_digest`).
`publish(hosts, generation)`, called once a commit has been applied to the
compiler, gives that generation to those of `hosts` whose digest changed,
wakes exactly those hosts' long-polls and returns their new (version, digest)
for the store to persist; a host whose content did not change keeps its
version and is not woken. Instructions are compiled, encoded and signed when
first read, once per version, and the signed JSON is kept for every later
reader: a burst of commits costs one signature per version actually read.

At start, `load(states)` adopts the persisted (version, digest) per host and
returns those whose content no longer matches (after an upgrade that compiles
differently, or a store restored from elsewhere); they are published at the
next generation, so an agent never holds stale instructions under a current
version number.
"""

from __future__ import annotations

import base64
from collections.abc import Collection, Iterable, Mapping

import msgspec
import nacl.signing

from segd import crypto
from segd.server.compiler import Compiler
from segd.server.notify import Hub

_JSON = msgspec.json.Encoder()

Versions = dict[str, tuple[int, str]]  # host -> (version, content digest)


class Publisher:
    def __init__(self, key: nacl.signing.SigningKey, compiler: Compiler) -> None:
        self._key = key
        self.key_id = crypto.key_id_of(key.verify_key)
        self.compiler = compiler
        self.hub = Hub()
        self._state: Versions = {}
        self._signed: dict[str, tuple[int, bytes]] = {}  # host -> (version, signed JSON)

    def load(self, states: Mapping[str, tuple[int, str]]) -> list[str]:
        """Adopt persisted (version, digest) per host; return those whose content differs."""
        self._state = dict(states)
        self._signed.clear()
        return sorted(h for h, (_, d) in self._state.items() if self.compiler.host_digest(h) != d)

    def add_host(self, host_id: str) -> None:
        """Track a new host (its first publication gives it a version)."""
        self._state.setdefault(host_id, (0, ""))

    def drop_host(self, host_id: str) -> None:
        self._state.pop(host_id, None)
        self._signed.pop(host_id, None)

    def publish(
        self, hosts: Iterable[str], generation: int, *, force: Collection[str] = ()
    ) -> Versions:
        """Give `generation` to those of `hosts` (known ones) whose content changed,
        and to those in `force` all the same; wake them, and return their new
        (version, digest)."""
        changed: Versions = {}
        for h in sorted({*hosts, *force}):
            state = self._state.get(h)
            if state is None:
                continue
            digest = self.compiler.host_digest(h)
            if digest != state[1] or h in force:
                changed[h] = self._state[h] = (generation, digest)
        for h in changed:
            self.hub.wake(h)
        return changed

    def version(self, host_id: str) -> int:
        return self._state.get(host_id, (0, ""))[0]

    def signed(self, host_id: str) -> bytes | None:
        """The host's current instructions, signed, as the JSON of a
        `SignedInstructions` (compiled and signed once per version, when first read)."""
        state = self._state.get(host_id)
        if state is None:
            return None
        version = state[0]
        cached = self._signed.get(host_id)
        if cached is not None and cached[0] == version:
            return cached[1]
        payload = self.compiler.encode(self.compiler.compile_host(host_id, version))
        out = signed_json(self._key, self.key_id, payload)
        self._signed[host_id] = (version, out)
        return out

    async def newer(self, host_id: str, since: int, wait_s: float) -> bytes | None:
        """The host's signed instructions once their version is above `since`
        (waiting up to `wait_s`), else None."""
        if self.version(host_id) <= since and wait_s > 0:
            await self.hub.wait(host_id, lambda: self.version(host_id) > since, wait_s)
        if self.version(host_id) <= since:
            return None
        return self.signed(host_id)


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
