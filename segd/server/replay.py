"""What keeps a signed agent request from being taken twice, also across a restart.

Within one process the nonce cache refuses a nonce seen in the last window.
Across a restart that cache is empty, so the server refuses every timestamp at
or before a floor: the moment the process started (everything accepted before
the restart was stamped before it, unless stamped ahead of the clock) and,
per host, the latest timestamp accepted ahead of the server clock by an earlier
process (its mark, written durably before such a request is taken).

The floor holds because a process starts (takes the store's lock, then reads
its clock) only after the one before it has stopped taking requests, on a wall
clock that does not step back across the restart. Stamps are rounded to the
millisecond, so "ahead" means by more than `RESOLUTION`, and the start floor is
that much after the start.

Only requests stamped ahead of the server clock move a mark, so an agent whose
clock is in sync costs no write; one whose clock runs fast costs one write per
request that is further ahead than any before. Pure: the store is the caller's.
"""

from __future__ import annotations

from collections.abc import Mapping

RESOLUTION = 0.001  # agents stamp requests to the millisecond


class ReplayMarks:
    def __init__(self, started_at: float, marks: Mapping[str, float]) -> None:
        self.started_at = started_at
        self._floor = dict(marks)  # as the store had them at start: fixed for this process
        self._durable = dict(marks)  # as the store has them now

    def floor(self, host_id: str) -> float:
        """A request of this host stamped at or before this is refused."""
        return max(self.started_at + RESOLUTION, self._floor.get(host_id, 0.0))

    def must_persist(self, host_id: str, ts: float, now: float) -> bool:
        """Whether taking a request stamped `ts` (checked, at `now`) first needs
        the host's mark raised durably."""
        return ts > now + RESOLUTION and ts > self._durable.get(host_id, 0.0)

    def persisted(self, host_id: str, ts: float) -> None:
        self._durable[host_id] = max(ts, self._durable.get(host_id, 0.0))
