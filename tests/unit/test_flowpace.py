"""The flow ingest pacer: a token bucket of records."""

from __future__ import annotations

import pytest

from segd.server.flowpace import Pacer


def test_records_within_the_bucket_go_at_once_then_wait_their_turn() -> None:
    p = Pacer(rate=1000, burst=2000, max_wait=5)
    assert p.take(1500, 0.0) == 0
    assert p.take(1000, 0.0) == pytest.approx(0.5)  # 500 short: half a second
    assert p.take(1000, 0.5) == pytest.approx(1.0)  # the booking above used the refill
    assert p.take(10, 10.0) == 0  # refilled (up to the burst)


def test_a_booking_that_would_wait_too_long_is_refused_and_books_nothing() -> None:
    p = Pacer(rate=100, burst=100, max_wait=1)
    assert p.take(100, 0.0) == 0
    assert p.take(500, 0.0) is None
    assert p.take(100, 0.0) == pytest.approx(1.0)


def test_records_given_back_are_booked_again_never_past_the_bucket() -> None:
    p = Pacer(rate=100, burst=100, max_wait=1)
    assert p.take(100, 0.0) == 0
    p.give_back(60)  # a batch refused after its booking
    assert p.take(60, 0.0) == 0
    p.give_back(1_000)
    assert p.take(101, 0.0) == pytest.approx(0.01)  # held at the bucket's size
