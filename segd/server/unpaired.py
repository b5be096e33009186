"""Addresses of containers whose pairing was refused, as last seen (pure, bounded).

Their agents isolate them, so `explain` can say that traffic to or from such an
address is dropped whatever the rules say. A container without a key never
asks to pair: the server cannot know its address, and `explain` calls it an
address that is no workload. An address is forgotten when a workload pairs with
it, and the oldest go first past `limit`.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable

LIMIT = 4096


@dataclasses.dataclass(frozen=True)
class Refused:
    host_id: str
    container_id: str
    reason: str  # the pairing's refusal code


class UnpairedSeen:
    def __init__(self, limit: int = LIMIT) -> None:
        self._limit = limit
        self._by_ip: OrderedDict[str, Refused] = OrderedDict()

    def refused(self, ips: Iterable[str], seen: Refused) -> None:
        for ip in ips:
            self._by_ip.pop(ip, None)
            self._by_ip[ip] = seen
        while len(self._by_ip) > self._limit:
            self._by_ip.popitem(last=False)

    def paired(self, ips: Iterable[str]) -> None:
        for ip in ips:
            self._by_ip.pop(ip, None)

    def get(self, ip: str) -> Refused | None:
        return self._by_ip.get(ip)

    def __len__(self) -> int:
        return len(self._by_ip)
