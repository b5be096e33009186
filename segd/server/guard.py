"""Who may knock how often: per-source rate limits and the summary of refusals.

Requests on routes that need no credentials are charged to their source's
token bucket before anything else; so are requests whose admin token or agent
signature is refused (a request with good credentials is never charged nor
limited). Beyond the bucket the answer is 429 with `Retry-After`, held back
for `ratelimit.HOLD_S` (`segd.http.errors`).

Every such refusal is noted in `Refusals`: a refused registration is audited
in full when it is the first of its source's window (`Service.register`), the
rest become one summary row per source and window (`requests.refused`), written
by `flush` from the server's housekeeping task and at shutdown.
"""

from __future__ import annotations

from segd import log
from segd.config import ServerConfig
from segd.errors import RateLimited, SegdError
from segd.ratelimit import TokenBuckets
from segd.server.refusals import Refusals, Summary
from segd.server.store import Store

_log = log.get("segd.server.guard")

MAX_SOURCES = 4096  # rate-limited sources tracked at once
SUMMARY_WINDOW_S = 60.0  # a source's refusals are summed up over this long
SUMMARY_SOURCES = 256  # sources summed up separately within a window
AUDITED_PER_WINDOW = 32  # refusals audited in full per window, all sources together
SUMMARY_EVENT = "requests.refused"


class Guard:
    def __init__(self, cfg: ServerConfig) -> None:
        self.buckets = TokenBuckets(cfg.rate_limit_per_s, cfg.rate_limit_burst, MAX_SOURCES)
        self.refusals = Refusals(SUMMARY_WINDOW_S, SUMMARY_SOURCES, AUDITED_PER_WINDOW)

    def admit(self, source: str, sample: str, now: float) -> None:
        """Charge a request that needs no credentials; RateLimited beyond the limit."""
        wait = self.buckets.take(source, now)
        if wait > 0:
            self.refusals.note(source, RateLimited.code, sample, now, audit=False)
            raise RateLimited(wait)

    def refused(self, source: str, err: SegdError, sample: str, now: float) -> SegdError:
        """Charge refused credentials; the error to answer (RateLimited beyond the limit)."""
        wait = self.buckets.take(source, now)
        if wait > 0:
            self.refusals.note(source, RateLimited.code, sample, now, audit=False)
            return RateLimited(wait)
        self.refusals.note(source, err.code, sample, now, audit=False)
        return err

    async def flush(self, store: Store, now: float, *, everything: bool = False) -> int:
        """Audit the summaries of ended windows (of all, with `everything`)."""
        summaries = self.refusals.drain() if everything else self.refusals.due(now)
        for s in summaries:  # logged first: they are in the log even if the store fails
            _log_summary(s)
        if summaries:
            async with store.write() as tx:
                for s in summaries:
                    tx.audit(s.last, SUMMARY_EVENT, "denied", s.reason, detail=s.detail())
        return len(summaries)


def _log_summary(s: Summary) -> None:
    _log.warning(
        "requests.refused",
        source=s.source,
        count=s.total,
        reasons=s.counts,
        first=s.first,
        last=s.last,
        sample=s.sample,
    )
