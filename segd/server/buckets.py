"""A digest of a growing collection that an edit updates in a small part of it.

`BucketDigest` digests a map of text keys to fixed-size byte values (a set's
addresses with empty values; a host's workload ids with their policy digests).
The keys are spread over 4,096 leaves by CRC-32 of their UTF-8, and the leaves
over 64 groups of 64. A leaf's digest is SHA-256 of its encoded entries in
byte order, a group's is SHA-256 of which of its leaves are non-empty and
their digests, and the whole digest is SHA-256 of a tag, which groups are
non-empty and their digests. So the digest is a function of the content alone
(two maps with the same entries have the same digest, however they were
built, in any process), and an edit costs rehashing one leaf (about 1/4,096 of
the map), one group and the top: a set of a hundred thousand addresses that
gains one is not hashed again in full.

Entries are encoded unambiguously: each key is preceded by its length (keys are
at most 65,535 bytes) and every value of one digest has the same size.

Pure: no I/O.
"""

from __future__ import annotations

import bisect
import hashlib
import zlib
from collections.abc import Iterable

GROUPS = 64
LEAVES = GROUPS * 64


class _Level:
    """Up to 64 numbered digests below one node, kept in number order, and which
    numbers are taken: the node's digest is SHA-256 of those (made on demand)."""

    __slots__ = ("digest", "digests", "numbers", "present")

    def __init__(self) -> None:
        self.numbers: list[int] = []
        self.digests: list[bytes] = []
        self.present = 0
        self.digest = b""

    def put(self, n: int, digest: bytes | None) -> None:
        """Give number `n` its digest (None: it is empty now)."""
        i = bisect.bisect_left(self.numbers, n)
        here = i < len(self.numbers) and self.numbers[i] == n
        if digest is None:
            if here:
                del self.numbers[i], self.digests[i]
                self.present &= ~(1 << n)
        elif here:
            self.digests[i] = digest
        else:
            self.numbers.insert(i, n)
            self.digests.insert(i, digest)
            self.present |= 1 << n
        self.digest = b""

    def make(self, prefix: bytes = b"") -> bytes:
        if not self.digest:
            h = hashlib.sha256(prefix + self.present.to_bytes(8, "big"))
            h.update(b"".join(self.digests))
            self.digest = h.digest()
        return self.digest


class BucketDigest:
    """A map of keys to values with a digest of its content; see the module."""

    __slots__ = ("_dirty", "_groups", "_leaves", "_tag", "_top")

    def __init__(self, tag: bytes, entries: Iterable[tuple[str, bytes]] = ()) -> None:
        self._tag = tag + b"\0"
        self._leaves: dict[int, dict[str, bytes]] = {}  # leaf -> key -> its encoded entry
        self._groups: dict[int, _Level] = {}  # non-empty groups: their leaves' digests
        self._top = _Level()  # the groups' digests
        self._dirty: set[int] = set()  # leaves changed since their digest was made
        for key, value in entries:
            self.put(key, value)

    def __len__(self) -> int:
        return sum(map(len, self._leaves.values()))

    def put(self, key: str, value: bytes = b"") -> None:
        """Add `key` (or give it `value`)."""
        raw = key.encode()
        leaf = zlib.crc32(raw) % LEAVES
        entry = len(raw).to_bytes(2, "big") + raw + value
        entries = self._leaves.get(leaf)
        if entries is None:
            entries = self._leaves[leaf] = {}
        if entries.get(key) != entry:
            entries[key] = entry
            self._dirty.add(leaf)

    def discard(self, key: str) -> None:
        """Remove `key` if present."""
        leaf = zlib.crc32(key.encode()) % LEAVES
        entries = self._leaves.get(leaf)
        if entries is None or entries.pop(key, None) is None:
            return
        if not entries:
            del self._leaves[leaf]
        self._dirty.add(leaf)

    def digest(self) -> bytes:
        if self._dirty:
            changed: set[int] = set()
            for leaf in self._dirty:
                g, i = divmod(leaf, 64)
                group = self._groups.get(g)
                if group is None:
                    group = self._groups[g] = _Level()
                entries = self._leaves.get(leaf)
                # Entries sort as bytes: an order given by the content alone.
                group.put(
                    i,
                    None
                    if entries is None
                    else hashlib.sha256(b"".join(sorted(entries.values()))).digest(),
                )
                changed.add(g)
            self._dirty.clear()
            for g in changed:
                group = self._groups[g]
                if group.numbers:
                    self._top.put(g, group.make())
                else:
                    del self._groups[g]
                    self._top.put(g, None)
        return self._top.make(self._tag)
