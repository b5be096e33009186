"""Per-source token buckets and what a source is: tables of input -> expected."""

from __future__ import annotations

import pytest

from segd.ratelimit import UNKNOWN, TokenBuckets, source_of

# (rate, burst, [(source, now)], expected waits)
CASES = [
    ("burst then refused", 1.0, 3, [("a", 0.0)] * 4, [0, 0, 0, 1.0]),
    ("refills at the rate", 2.0, 1, [("a", 0.0), ("a", 0.0), ("a", 0.5)], [0, 0.5, 0]),
    ("a refusal spends nothing", 1.0, 1, [("a", 0.0), ("a", 0.5), ("a", 1.0)], [0, 0.5, 0]),
    ("never above the burst", 10.0, 2, [("a", 0.0)] + [("a", 100.0)] * 3, [0, 0, 0, 0.1]),
    ("sources are apart", 1.0, 1, [("a", 0.0), ("b", 0.0), ("a", 0.0)], [0, 0, 1.0]),
    ("a clock that steps back refills nothing", 1.0, 1, [("a", 10.0), ("a", 5.0)], [0, 1.0]),
]


@pytest.mark.parametrize(
    ("rate", "burst", "calls", "waits"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_take(rate: float, burst: int, calls: list[tuple[str, float]], waits: list[float]) -> None:
    b = TokenBuckets(rate, burst)
    assert [b.take(src, now) for src, now in calls] == pytest.approx(waits)


def test_the_table_is_bounded_and_refilled_buckets_make_room() -> None:
    b = TokenBuckets(rate=1.0, burst=2, max_sources=3)
    for src in "abc":
        assert b.take(src, 0.0) == 0
    # All three are still draining: a fourth source shares the overflow bucket.
    assert [b.take("d", 0.0), b.take("e", 0.0), b.take("f", 0.0)] == [0, 0, 1.0]
    assert len(b) == 3
    # Once the oldest has refilled it is dropped (a full bucket is as good as none).
    assert b.take("g", 1.0) == 0
    assert len(b) == 3
    assert b.take("a", 1.0) == 0  # back with a full bucket


def test_an_address_spread_beyond_the_table_is_still_limited() -> None:
    b = TokenBuckets(rate=0.01, burst=1, max_sources=10)
    admitted = sum(b.take(f"10.0.{i // 256}.{i % 256}", 0.0) == 0 for i in range(5000))
    assert admitted == 10 + 1  # one per tracked source, one for all the others


@pytest.mark.parametrize("bad", [(0.0, 1, 1), (1.0, 0, 1), (1.0, 1, 0), (-1.0, 5, 5)])
def test_nonsense_parameters_are_refused(bad: tuple[float, int, int]) -> None:
    with pytest.raises(ValueError):
        TokenBuckets(*bad)


@pytest.mark.parametrize(
    ("peer", "source"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::1", "::/64"),
        (None, UNKNOWN),
        ("", UNKNOWN),
        ("/run/segd.sock", UNKNOWN),
    ],
)
def test_source_of(peer: str | None, source: str) -> None:
    assert source_of(peer) == source
