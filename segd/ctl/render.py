"""Text in and out of `segd ctl`: label and lifespan syntax, aligned tables, times.

Label sets are only split here (`role=web,app=shop`); the server checks the
dimensions and values against its own configuration.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence

from segd.ctl.client import CtlError
from segd.policy import IP_PREFIX, Selectors

_LIFESPAN_RE = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_lifespan(text: str) -> int:
    """`90s`, `30m`, `1h`, `2d` (or plain seconds) -> seconds."""
    m = _LIFESPAN_RE.match(text.strip().lower())
    if not m or int(m.group(1)) <= 0:
        raise CtlError(f"invalid lifespan {text!r}: use e.g. 90s, 30m, 1h, 2d", 2)
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_max_uses(text: str) -> int | None:
    """`5` -> 5, `unlimited` -> None (the API's null)."""
    t = text.strip().lower()
    if t == "unlimited":
        return None
    if not (t.isascii() and t.isdigit()) or int(t) <= 0:
        raise CtlError(f"invalid --max-uses {text!r}: use a positive number or 'unlimited'", 2)
    return int(t)


def max_uses_text(max_uses: int | None) -> str:
    return "∞" if max_uses is None else str(max_uses)


def format_lifespan(seconds: float) -> str:
    s = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


def parse_labels(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        dim, sep, value = part.partition("=")
        if not sep or not dim.strip():
            raise CtlError(f"invalid label {part!r}: expected dimension=value", 2)
        if dim.strip() in out:
            raise CtlError(f"label dimension {dim.strip()!r} given twice", 2)
        out[dim.strip()] = value.strip()
    return out


def parse_selectors(texts: Sequence[str]) -> Selectors:
    """Repeated `--provider`/`--consumer` values: label sets, or `any` alone."""
    items = [t.strip() for t in texts]
    if "any" in items:
        if len(items) > 1:
            raise CtlError("'any' cannot be combined with label sets", 2)
        return "any"
    return [parse_labels(t) for t in items]


def parse_side(texts: Sequence[str]) -> tuple[Selectors, list[str]]:
    """Repeated `--provider`/`--consumer` values: label sets and `ip:CIDR` address
    blocks (the server validates them), or `any` alone."""
    items = [t.strip() for t in texts]
    blocks = [t[len(IP_PREFIX) :].strip() for t in items if t.startswith(IP_PREFIX)]
    labels = [t for t in items if not t.startswith(IP_PREFIX)]
    if blocks and "any" in labels:
        raise CtlError("'any' cannot be combined with ip: address blocks", 2)
    if any(not b for b in blocks):
        raise CtlError("ip: needs an address block, e.g. ip:203.0.113.0/24", 2)
    return (parse_selectors(labels) if labels else []), blocks


def labels_text(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels)) or "-"


def selectors_text(sel: object, blocks: Sequence[str] = ()) -> str:
    """A rule side: its label sets and address blocks (`ip:CIDR`), or `any`."""
    if sel == "any" or not isinstance(sel, list):
        return "any"
    parts = [labels_text(s) for s in sel] + [f"{IP_PREFIX}{b}" for b in blocks]
    return " | ".join(parts) or "-"


def when(t: float) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def printable(text: str) -> str:
    """`text` safe for a terminal: anything not printable (control characters,
    escape sequences, bidirectional overrides) is shown escaped, e.g. `\\u202e`."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An aligned plain-text table; the last column is not padded. Cells hold what
    the server sent (written by agents too): they are escaped, never printed raw."""
    cells = [[printable(str(c)) if str(c) != "" else "-" for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = []
    for row in [list(headers), *cells]:
        padded = [c.ljust(widths[i]) for i, c in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)
