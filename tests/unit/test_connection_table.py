"""The connection table: who is counted, and who is closed to admit another."""

from __future__ import annotations

from segd.http.connections import ConnectionTable


def test_below_the_limit_nothing_is_closed() -> None:
    t = ConnectionTable(3)
    for fd in (10, 11):
        t.opened(fd)
    assert not t.full and len(t) == 2


def test_the_longest_quiet_connection_is_the_victim() -> None:
    t = ConnectionTable(3)
    for fd in (10, 11, 12):
        t.opened(fd)
    t.busy(10)
    t.quiet(10)  # answered: quiet again, but only since now
    assert t.full
    assert t.victim() == 11
    assert t.victim() == 12
    assert t.victim() == 10


def test_a_busy_connection_is_never_a_victim() -> None:
    t = ConnectionTable(2)
    t.opened(10)
    t.opened(11)
    t.busy(10)
    t.busy(11)
    assert t.full and t.victim() is None


def test_quiet_ones_go_before_those_still_sending_a_body() -> None:
    t = ConnectionTable(3)
    for fd in (10, 11, 12):
        t.opened(fd)
    t.reading(10)
    t.busy(11)
    assert t.victim() == 12
    assert t.victim() == 10
    assert t.victim() is None


def test_a_victim_is_counted_until_closed_but_frees_its_slot_at_once() -> None:
    t = ConnectionTable(2)
    t.opened(10)
    t.opened(11)
    assert t.victim() == 10
    assert len(t) == 2 and not t.full  # the newcomer may be admitted now
    t.opened(12)
    assert t.full
    t.busy(10)  # a late state change does not bring the victim back
    t.closed(10)
    assert len(t) == 2 and t.victim() == 11


def test_closing_an_unknown_connection_is_harmless() -> None:
    t = ConnectionTable(2)
    t.closed(99)
    t.quiet(99)
    assert len(t) == 0
