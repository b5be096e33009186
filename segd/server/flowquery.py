"""Which flows a query or a live stream asks for: a filter, and its test on a flow.

`FlowFilter` is what `GET /v1/flows`, the stream and the export take (the flow
store turns it into SQL; the stream tests each new flow with `matches`). Label
selectors match as rules do: every label of the selector is on that end.
Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from segd import policy, wire
from segd.errors import InvalidInput

VERDICTS: tuple[wire.Verdict, ...] = ("allowed", "blocked", "potentially_blocked")


@dataclasses.dataclass(frozen=True)
class FlowFilter:
    since: float | None = None  # last seen at or after
    until: float | None = None  # last seen at or before
    src: policy.Labels = dataclasses.field(default_factory=dict)
    dst: policy.Labels = dataclasses.field(default_factory=dict)
    workload: str = ""  # either end
    port: int | None = None
    verdict: str = ""
    rule: str = ""

    def matches(self, f: wire.Flow) -> bool:
        return (
            (self.since is None or f.last_seen >= self.since)
            and (self.until is None or f.last_seen <= self.until)
            and policy.matches(f.src.labels, self.src)
            and policy.matches(f.dst.labels, self.dst)
            and (not self.workload or self.workload in (f.src.workload_id, f.dst.workload_id))
            and (self.port is None or f.port == self.port)
            and (not self.verdict or f.verdict == self.verdict)
            and (not self.rule or f.rule_id == self.rule)
        )


def _number(query: Mapping[str, str], name: str) -> float | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(
            f"query parameter {name!r} must be a number (seconds since the epoch)"
        ) from None
    if not 0 <= value <= 2**62:  # NaN too
        raise InvalidInput(f"query parameter {name!r} must be between 0 and {2**62}")
    return value


def _labels(query: Mapping[str, str], name: str, dims: Iterable[str]) -> policy.Labels:
    raw = query.get(name)
    if not raw:
        return {}
    try:
        return policy.parse_labels(raw, dims)
    except InvalidInput as e:
        raise InvalidInput(f"query parameter {name!r}: {e.message}") from None


def _port(query: Mapping[str, str]) -> int | None:
    raw = query.get("port")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or not 0 <= int(raw) <= 65535:
        raise InvalidInput("query parameter 'port' must be a port number (0-65535)")
    return int(raw)


def _short(query: Mapping[str, str], name: str) -> str:
    value = query.get(name, "")
    if len(value) > 128 or not value.isprintable():
        raise InvalidInput(f"query parameter {name!r}: at most 128 printable characters")
    return value


def parse(query: Mapping[str, str], dims: Iterable[str]) -> FlowFilter:
    """A filter from query parameters (`since`, `until`, `src`, `dst`, `workload`,
    `port`, `verdict`, `rule`); InvalidInput naming the bad one."""
    dims = tuple(dims)
    verdict = query.get("verdict", "")
    if verdict and verdict not in VERDICTS:
        raise InvalidInput(f"query parameter 'verdict' must be one of {', '.join(VERDICTS)}")
    flt = FlowFilter(
        since=_number(query, "since"),
        until=_number(query, "until"),
        src=_labels(query, "src", dims),
        dst=_labels(query, "dst", dims),
        workload=_short(query, "workload"),
        port=_port(query),
        verdict=verdict,
        rule=_short(query, "rule"),
    )
    if flt.since is not None and flt.until is not None and flt.since > flt.until:
        raise InvalidInput("query parameter 'since' is after 'until'")
    return flt
