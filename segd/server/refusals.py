"""Refused requests by source: the first of a window audited in full, the rest summed up.

A flood of refused requests from one address must not become one durable
audit row and one log line each. `Refusals.note` opens a window for the
source and says whether this refusal is the one to audit in full (the first
auditable one of the window, while the global budget of such rows lasts); the
others are counted by reason, with the time of the first and the last and a
sample of what was sent (clipped). `due(now)` hands out one `Summary` per
source whose window has ended, `drain()` all of them (at shutdown).

Memory is bounded: at most `max_sources` windows; refusals from further
sources are summed up together under `OVERFLOW`. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import time

OVERFLOW = "other addresses"
SAMPLE_MAX = 64  # characters of attacker-chosen text kept in a sample


def clip(text: str, limit: int = SAMPLE_MAX) -> str:
    """`text` as one short line of printable characters (the others escaped)."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclasses.dataclass
class Summary:
    """Refusals from one source over one window, beyond the one audited in full."""

    source: str
    first: float
    last: float
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> how many
    sample: str = ""  # what the latest refusal carried (clipped)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def reason(self) -> str:
        """The most frequent reason (ties: the first in name order)."""
        return min(self.counts, key=lambda r: (-self.counts[r], r))

    def detail(self) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.counts.items()))
        text = (
            f"{self.total} refused from {self.source} between {_utc(self.first)} "
            f"and {_utc(self.last)}: {reasons}"
        )
        return f"{text}; last: {self.sample}" if self.sample else text


@dataclasses.dataclass
class _Window:
    start: float
    audited: bool = False
    summary: Summary | None = None


class Refusals:
    def __init__(
        self, window_s: float = 60.0, max_sources: int = 256, max_audited: int = 32
    ) -> None:
        self.window_s = window_s
        self.max_sources = max_sources
        self.max_audited = max_audited  # rows in full per window_s, all sources together
        self._windows: dict[str, _Window] = {}
        self._budget = max_audited
        self._budget_from = -float("inf")

    def note(self, source: str, reason: str, sample: str, now: float, *, audit: bool) -> bool:
        """Count one refusal; True when the caller audits this one in full (only
        ever for `audit` refusals: the others are always summed up)."""
        if now - self._budget_from >= self.window_s:
            self._budget, self._budget_from = self.max_audited, now
        w = self._windows.get(source)
        if w is None:
            if len(self._windows) >= self.max_sources:
                source = OVERFLOW
                w = self._windows.get(source)
            if w is None:
                w = self._windows[source] = _Window(now)
        if audit and not w.audited and self._budget > 0:
            w.audited = True
            self._budget -= 1
            return True
        s = w.summary
        if s is None:
            s = w.summary = Summary(source, now, now)
        s.counts[reason] = s.counts.get(reason, 0) + 1
        s.first, s.last = min(s.first, now), max(s.last, now)
        s.sample = clip(sample)
        return False

    def due(self, now: float) -> list[Summary]:
        """Summaries of the windows that have ended (those windows are closed)."""
        ended = [src for src, w in self._windows.items() if now - w.start >= self.window_s]
        return self._close(ended)

    def drain(self) -> list[Summary]:
        """Every summary, ended or not (every window is closed)."""
        return self._close(list(self._windows))

    def _close(self, sources: list[str]) -> list[Summary]:
        out = []
        for src in sources:
            s = self._windows.pop(src).summary
            if s is not None:
                out.append(s)
        return out

    def __len__(self) -> int:
        """Open windows."""
        return len(self._windows)
