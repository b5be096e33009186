"""A digest of a growing collection that an edit updates in a small part of it.

`BucketDigest` digests a map of text keys to fixed-size byte values (a set's
addresses with empty values; a host's workload ids with their policy digests).
The keys are spread over `BUCKETS` buckets by CRC-32 of their UTF-8; each
bucket's digest is SHA-256 of its encoded entries in byte order, and the whole digest is
SHA-256 of a tag, which buckets are non-empty and their digests. So the digest
is a function of the content alone (two maps with the same entries have the
same digest, however they were built, in any process), and an edit costs
rehashing one bucket, about 1/64 of the map, and 64 digests: a set of ten
thousand addresses that gains one is not hashed again in full.

Entries are encoded unambiguously: each key is preceded by its length (keys are
at most 65,535 bytes) and every value of one digest has the same size.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable

BUCKETS = 64


class BucketDigest:
    """A map of keys to values with a digest of its content; see the module."""

    __slots__ = ("_buckets", "_digests", "_dirty", "_present", "_tag", "_top")

    def __init__(self, tag: bytes, entries: Iterable[tuple[str, bytes]] = ()) -> None:
        self._tag = tag
        # bucket -> key -> its encoded entry; only non-empty buckets
        self._buckets: dict[int, dict[str, bytes]] = {}
        self._digests = [b""] * BUCKETS  # b"" for an empty bucket
        self._dirty: set[int] = set()
        self._present = 0  # bit b: bucket b is non-empty
        self._top = b""
        for key, value in entries:
            self.put(key, value)

    def __len__(self) -> int:
        return sum(map(len, self._buckets.values()))

    def put(self, key: str, value: bytes = b"") -> None:
        """Add `key` (or give it `value`)."""
        raw = key.encode()
        b = zlib.crc32(raw) % BUCKETS
        entry = len(raw).to_bytes(2, "big") + raw + value
        bucket = self._buckets.get(b)
        if bucket is None:
            bucket = self._buckets[b] = {}
            self._present |= 1 << b
        if bucket.get(key) != entry:
            bucket[key] = entry
            self._dirty.add(b)
            self._top = b""

    def discard(self, key: str) -> None:
        """Remove `key` if present."""
        b = zlib.crc32(key.encode()) % BUCKETS
        bucket = self._buckets.get(b)
        if bucket is None or bucket.pop(key, None) is None:
            return
        if not bucket:
            del self._buckets[b]
            self._present &= ~(1 << b)
            self._digests[b] = b""
            self._dirty.discard(b)
        else:
            self._dirty.add(b)
        self._top = b""

    def digest(self) -> bytes:
        if not self._top:
            for b in self._dirty:
                # Entries sort as bytes: an order given by the content alone.
                entries = sorted(self._buckets[b].values())
                self._digests[b] = hashlib.sha256(b"".join(entries)).digest()
            self._dirty.clear()
            # Which buckets are non-empty, then their digests in bucket order.
            present = self._present.to_bytes(BUCKETS // 8, "big")
            h = hashlib.sha256(self._tag + b"\0" + present)
            h.update(b"".join(self._digests))
            self._top = h.digest()
        return self._top
