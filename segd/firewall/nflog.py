"""What segd's tables log, and how a log prefix reads back (pure).

Kernel-log `log prefix` prints nothing inside a container namespace while
`net.netfilter.nf_log_all_netns=0` (the default), so every `log` segd renders
is NFLOG: `log group GROUP prefix "…"`, read by a netlink socket bound to
`GROUP` inside the same namespace (`segd.firewall.kernel`). NFLOG groups are
per network namespace, so one fixed group serves every container.

A prefix says what the packet met: `segd:<direction>:<verdict>[:<rule id>]`,
direction `in` or `out` as seen from the container whose table logged it;
verdict `a` (accepted by the rule named), `b` (dropped by the chain's policy),
`p` (visibility mode: would have been dropped, accepted). Drops are logged at
most `DROP_RATE` packets a second per direction (burst `DROP_BURST`), so a
flood costs the reader a bounded rate; accepts are logged only for the first
packet of a connection (established traffic is accepted before any rule).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from segd.wire import Direction, Verdict

GROUP = 7
"""The NFLOG group of every segd log rule (per namespace: no clash between containers)."""

GATE_LOG_KEY = ""
"""The key packets the host gate logged come with (container keys are never empty)."""

DROP_RATE = 100
DROP_BURST = 200

_CODES: dict[Verdict, str] = {"allowed": "a", "blocked": "b", "potentially_blocked": "p"}
_VERDICTS: dict[str, Verdict] = {v: k for k, v in _CODES.items()}

Code = Literal["a", "b", "p"]


class LogPacket(NamedTuple):
    """One logged packet: its prefix and the addresses, protocol and ports in it."""

    prefix: str
    src: str
    dst: str
    proto: str  # "tcp", "udp", "icmp" or "other"
    sport: int
    dport: int
    length: int  # the packet's length on the wire (the IP header's total)


class Tag(NamedTuple):
    """What a log prefix says."""

    direction: Direction
    verdict: Verdict
    rule_id: str = ""


def prefix(direction: Direction, verdict: Verdict, rule_id: str = "") -> str:
    """The prefix text (callers validate `rule_id`)."""
    text = f"segd:{direction}:{_CODES[verdict]}"
    return f"{text}:{rule_id}" if rule_id else text


def statement(direction: Direction, verdict: Verdict, rule_id: str = "") -> str:
    """The nft `log` statement for that prefix."""
    return f'log group {GROUP} prefix "{prefix(direction, verdict, rule_id)}"'


def limited(direction: Direction, verdict: Verdict) -> str:
    """A rule that logs at most `DROP_RATE` packets/s and lets the packet go on."""
    return (
        f"limit rate {DROP_RATE}/second burst {DROP_BURST} packets {statement(direction, verdict)}"
    )


def parse(text: str) -> Tag | None:
    """A prefix back into what it says; None for anything segd did not render."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[0] != "segd" or parts[1] not in ("in", "out"):
        return None
    verdict = _VERDICTS.get(parts[2])
    if verdict is None:
        return None
    direction: Direction = "in" if parts[1] == "in" else "out"
    rule_id = parts[3] if len(parts) == 4 else ""
    if len(parts) == 4 and not rule_id:
        return None
    return Tag(direction, verdict, rule_id)
