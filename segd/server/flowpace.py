"""How fast flow records are taken in: one token bucket of records (pure).

Flow reports share the server's process with pairing; paced, a burst of
reports cannot take the CPU pairing needs. `take(n, now)` books `n` records
and answers how long the caller waits before it goes on (0 while within the
bucket); a booking that would wait longer than `max_wait` is not made (None),
and the caller answers `busy` instead.
"""

from __future__ import annotations


class Pacer:
    def __init__(self, rate: float, burst: float, max_wait: float) -> None:
        self.rate = rate
        self.burst = burst
        self.max_wait = max_wait
        self._tokens = burst
        self._at: float | None = None

    def take(self, n: int, now: float) -> float | None:
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        wait = max(0.0, (n - self._tokens) / self.rate)
        if wait > self.max_wait:
            return None
        self._tokens -= n
        return wait

    def give_back(self, n: int) -> None:
        """Return `n` records booked by `take` that were not taken in after all."""
        self._tokens = min(self.burst, self._tokens + n)
