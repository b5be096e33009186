"""Per-source token buckets: how often one address may call without credentials.

A source (an IPv4 address, or an IPv6 /64: one host's share of a network) gets
`burst` requests at once and `rate` more per second. `take(source, now)`
answers 0 when the request may go on, else the seconds until it may.

Memory is bounded: at most `max_sources` buckets, least recently used first in
line. A bucket that has filled up again is the same as none and is dropped to
make room; when every tracked source is still draining, new sources share one
overflow bucket, so addresses beyond the table are limited together rather
than not at all. Pure: no I/O, the caller passes the time.

Whoever answers a refusal holds it back for `HOLD_S` first: answering a
refused request costs a server almost as much as answering a good one, so a
source must not get refusals as fast as it can ask for them. Held, a flood
over a few connections becomes a trickle.
"""

from __future__ import annotations

import dataclasses
import ipaddress

UNKNOWN = "unknown"
HOLD_S = 1.0  # how long a rate-limited answer is held back


@dataclasses.dataclass
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    def __init__(self, rate: float, burst: float, max_sources: int = 4096) -> None:
        if not (rate > 0 and burst >= 1 and max_sources >= 1):
            raise ValueError("rate > 0, burst >= 1 and max_sources >= 1 are needed")
        self.rate = rate
        self.burst = float(burst)
        self.max_sources = max_sources
        self._buckets: dict[str, _Bucket] = {}  # in order of last use, oldest first
        self._overflow: _Bucket | None = None

    def take(self, source: str, now: float, cost: float = 1.0) -> float:
        """Spend `cost` tokens of the source's bucket: 0.0 when there were enough,
        else the seconds until there will be (nothing is spent then)."""
        bucket = self._bucket(source, now)
        tokens = min(self.burst, bucket.tokens + max(0.0, now - bucket.at) * self.rate)
        bucket.at = now
        if tokens >= cost:
            bucket.tokens = tokens - cost
            return 0.0
        bucket.tokens = tokens
        return (cost - tokens) / self.rate

    def _bucket(self, source: str, now: float) -> _Bucket:
        found = self._buckets.pop(source, None)
        if found is None and len(self._buckets) >= self.max_sources:
            oldest = next(iter(self._buckets))
            if not self._full(self._buckets[oldest], now):
                if self._overflow is None:
                    self._overflow = _Bucket(self.burst, now)
                return self._overflow
            del self._buckets[oldest]
        bucket = found or _Bucket(self.burst, now)
        self._buckets[source] = bucket  # now the most recently used
        return bucket

    def _full(self, b: _Bucket, now: float) -> bool:
        return b.tokens + max(0.0, now - b.at) * self.rate >= self.burst

    def __len__(self) -> int:
        """Tracked sources (the overflow bucket not counted)."""
        return len(self._buckets)


def source_of(peer: str | None) -> str:
    """The rate-limited source of a peer address: the address itself for IPv4
    (also IPv4-mapped IPv6), the /64 network for IPv6."""
    if not peer:
        return UNKNOWN
    try:
        addr = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return UNKNOWN
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)
