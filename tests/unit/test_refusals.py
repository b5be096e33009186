"""Refusals summed up per source and window: tables of input -> expected."""

from __future__ import annotations

import pytest

from segd.server.refusals import OVERFLOW, SAMPLE_MAX, Refusals, clip

# (name, notes as (source, reason, now, audit), expected answers of note)
CASES = [
    (
        "the first auditable refusal of a window is audited, the rest are not",
        [("a", "bad", 0.0, True), ("a", "bad", 1.0, True), ("a", "bad", 2.0, True)],
        [True, False, False],
    ),
    (
        "each source has its own window",
        [("a", "bad", 0.0, True), ("b", "bad", 0.0, True), ("a", "bad", 0.0, True)],
        [True, True, False],
    ),
    (
        "a refusal that is never audited in full does not use the window's",
        [("a", "rate_limited", 0.0, False), ("a", "bad", 1.0, True), ("a", "bad", 2.0, True)],
        [False, True, False],
    ),
]


@pytest.mark.parametrize(("notes", "answers"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_note(notes: list[tuple[str, str, float, bool]], answers: list[bool]) -> None:
    r = Refusals(window_s=60.0)
    assert [r.note(src, why, "", now, audit=a) for src, why, now, a in notes] == answers


def test_a_window_ends_in_one_summary_and_a_new_one_opens() -> None:
    r = Refusals(window_s=60.0)
    assert r.note("a", "bad_code", "hostname h1", 10.0, audit=True)
    for i in range(999):
        r.note(
            "a",
            "bad_code" if i % 3 else "rate_limited",
            f"hostname h{i}",
            11.0 + i / 100,
            audit=True,
        )
    assert r.due(69.9) == []  # the window is not over yet
    [s] = r.due(70.0)
    assert (s.source, s.total, s.first, s.last) == ("a", 999, 11.0, 11.0 + 998 / 100)
    assert s.counts == {"bad_code": 666, "rate_limited": 333}
    assert s.reason == "bad_code" and s.sample == "hostname h998"
    assert "999 refused from a" in s.detail() and "bad_code 666, rate_limited 333" in s.detail()
    assert len(r) == 0
    assert r.note("a", "bad_code", "", 71.0, audit=True)  # a new window: audited in full again


def test_a_window_with_only_its_audited_refusal_has_no_summary() -> None:
    r = Refusals(window_s=60.0)
    assert r.note("a", "bad", "", 0.0, audit=True)
    assert r.due(60.0) == [] and len(r) == 0


def test_drain_closes_every_window() -> None:
    r = Refusals(window_s=60.0)
    r.note("a", "x", "", 0.0, audit=False)
    r.note("b", "y", "", 1.0, audit=False)
    assert sorted((s.source, s.total) for s in r.drain()) == [("a", 1), ("b", 1)]
    assert len(r) == 0


def test_sources_beyond_the_table_are_summed_up_together() -> None:
    r = Refusals(window_s=60.0, max_sources=4)
    for i in range(100):
        r.note(f"10.0.0.{i}", "bad", "", 0.0, audit=False)
    summaries = {s.source: s.total for s in r.due(60.0)}
    assert len(summaries) == 5 and summaries[OVERFLOW] == 96


def test_rows_audited_in_full_are_bounded_across_sources() -> None:
    r = Refusals(window_s=60.0, max_sources=1000, max_audited=5)
    audited = sum(r.note(f"s{i}", "bad", "", 0.0, audit=True) for i in range(100))
    assert audited == 5
    assert sum(r.note(f"t{i}", "bad", "", 60.0, audit=True) for i in range(100)) == 5


@pytest.mark.parametrize(
    ("text", "clipped"),
    [
        ("host-1", "host-1"),
        ("a\nb", "a\\nb"),
        ("\u202eevil", "\\u202eevil"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("x" * 1000, "x" * (SAMPLE_MAX - 3) + "..."),
    ],
)
def test_clip(text: str, clipped: str) -> None:
    assert clip(text) == clipped
    assert len(clip(text)) <= SAMPLE_MAX and clip(text).isprintable()
