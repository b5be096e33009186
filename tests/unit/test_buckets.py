"""`BucketDigest`: a digest of the content alone, kept current by small edits."""

from __future__ import annotations

import random

from segd.server.buckets import BucketDigest


def _entries(n: int) -> list[tuple[str, bytes]]:
    return [(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", b"") for i in range(n)]


def test_the_digest_is_the_contents_whatever_the_order_of_the_edits() -> None:
    rnd = random.Random(7)
    entries = _entries(500)
    a = BucketDigest(b"set", entries)
    shuffled = entries[:]
    rnd.shuffle(shuffled)
    b = BucketDigest(b"set")
    for key, value in [*shuffled, ("192.0.2.1", b"")]:
        b.put(key, value)
    assert a.digest() != b.digest()
    b.discard("192.0.2.1")
    assert a.digest() == b.digest()


def test_every_edit_changes_the_digest_and_undoing_it_restores_it() -> None:
    d = BucketDigest(b"rows", [(f"w{i}", bytes(32)) for i in range(200)])
    start = d.digest()
    seen = {start}
    for i in range(200):
        d.put(f"w{i}", b"\x01" * 32)  # a new value
        assert d.digest() not in seen
        seen.add(d.digest())
        d.put(f"w{i}", bytes(32))
        assert d.digest() == start
    d.discard("w0")
    assert d.digest() not in seen
    d.discard("w0")  # absent: nothing changes
    d.put("w0", bytes(32))
    assert d.digest() == start


def test_the_tag_the_keys_and_the_values_all_count() -> None:
    base = BucketDigest(b"web", [("10.0.0.1", b"")]).digest()
    assert BucketDigest(b"api", [("10.0.0.1", b"")]).digest() != base
    assert BucketDigest(b"web", [("10.0.0.2", b"")]).digest() != base
    assert BucketDigest(b"web", [("10.0.0.1", b"x")]).digest() != base
    assert BucketDigest(b"web").digest() != base
    # Keys are length-prefixed: two entries never read as one.
    assert (
        BucketDigest(b"t", [("ab", b""), ("c", b"")]).digest()
        != BucketDigest(b"t", [("a", b""), ("bc", b"")]).digest()
    )


def test_an_emptied_map_digests_as_a_new_one() -> None:
    d = BucketDigest(b"set", _entries(100))
    for key, _ in _entries(100):
        d.discard(key)
    assert d.digest() == BucketDigest(b"set").digest()
    assert len(d) == 0


def test_random_edits_always_digest_as_a_map_built_fresh() -> None:
    rnd = random.Random(11)
    d = BucketDigest(b"rows")
    model: dict[str, bytes] = {}
    for step in range(3000):
        key = f"w{rnd.randrange(400)}"
        if rnd.random() < 0.35:
            d.discard(key)
            model.pop(key, None)
        else:
            value = bytes([rnd.randrange(3)]) * 32
            d.put(key, value)
            model[key] = value
        if step % 7 == 0:  # digests asked for now and then: edits pile up between
            assert d.digest() == BucketDigest(b"rows", model.items()).digest(), step
    assert len(d) == len(model)
