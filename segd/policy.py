"""The label policy model: dimensions, label sets, services and rules.

A workload carries at most one value per label dimension. A label set used in a
rule is a *selector*: a workload matches it when it has every label in it (subset
match), so `{}` matches every workload. A rule lets its consumers reach its
providers on its services; everything else is dropped. `"any"` on either side
means any address at all, workload or not. A side may also name address blocks
(`ip:` peers, CIDRs): traffic from or to those addresses, whoever they are.

Rule option `encrypted`: the rule's remote peers are admitted only by their
mesh addresses (their traffic crosses hosts only through the segd mesh);
peers on the same host are admitted whatever their address. Such a rule has
no `any` side and no address blocks.

Pure values and functions only: no I/O.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Literal

import msgspec

from segd.errors import InvalidInput

DEFAULT_DIMENSIONS: tuple[str, ...] = ("role", "app", "env", "loc")
MAX_DIMENSIONS = 16
DIMENSION_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}\Z")
# Values are short identifiers. They never reach a ruleset (sets are named by a
# digest), but a strict alphabet keeps audit logs, tables and shells boring.
VALUE_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,62})\Z")
RULE_OPTIONS = frozenset({"log", "encrypted"})
ENCRYPTED = "encrypted"
IP_PREFIX = "ip:"  # `--provider ip:CIDR` on the command line

Labels = dict[str, str]
Selectors = list[Labels] | Literal["any"]
Proto = Literal["tcp", "udp", "icmp"]


class Service(msgspec.Struct, frozen=True, order=True):
    """One service: a protocol and, for tcp/udp, an inclusive port range."""

    proto: Proto
    port: int = 0
    port_end: int = 0

    def __str__(self) -> str:
        if self.proto == "icmp":
            return "icmp"
        if self.port == self.port_end:
            return f"{self.proto}/{self.port}"
        return f"{self.proto}/{self.port}-{self.port_end}"


def validate_dimensions(dims: Iterable[str]) -> tuple[str, ...]:
    out = tuple(dims)
    if not out:
        raise InvalidInput("at least one label dimension is required")
    if len(out) > MAX_DIMENSIONS:
        raise InvalidInput(f"at most {MAX_DIMENSIONS} label dimensions are allowed")
    for d in out:
        if not DIMENSION_RE.match(d):
            raise InvalidInput(f"invalid label dimension {d!r}: use [a-z][a-z0-9_]*, max 32")
    if len(set(out)) != len(out):
        raise InvalidInput("label dimensions must be unique")
    return out


def validate_labels(labels: Mapping[str, str], dimensions: Iterable[str]) -> Labels:
    """Check dimensions and values; return the label set sorted by dimension."""
    dims = set(dimensions)
    for dim, value in labels.items():
        if dim not in dims:
            known = ", ".join(sorted(dims))
            raise InvalidInput(f"unknown label dimension {dim!r} (known: {known})")
        if not isinstance(value, str) or not VALUE_RE.match(value):
            raise InvalidInput(
                f"invalid value {value!r} for label {dim!r}: use letters, digits, '_', '.', "
                "'-', starting with a letter or digit, max 63"
            )
    return {k: labels[k] for k in sorted(labels)}


def parse_labels(text: str, dimensions: Iterable[str]) -> Labels:
    """Parse `role=web,app=shop` into a validated label set."""
    out: dict[str, str] = {}
    text = text.strip()
    if not text:
        return out
    for part in text.split(","):
        part = part.strip()
        if "=" not in part:
            raise InvalidInput(f"invalid label {part!r}: expected dimension=value")
        dim, _, value = part.partition("=")
        dim, value = dim.strip(), value.strip()
        if dim in out:
            raise InvalidInput(f"label dimension {dim!r} given twice")
        out[dim] = value
    return validate_labels(out, dimensions)


def parse_selectors(texts: Iterable[str], dimensions: Iterable[str]) -> Selectors:
    """Parse repeated `--provider`/`--consumer` values; `any` stands alone."""
    items = [t.strip() for t in texts]
    if not items:
        raise InvalidInput("at least one label set (or 'any') is required")
    if "any" in items:
        if len(items) > 1:
            raise InvalidInput("'any' cannot be combined with label sets")
        return "any"
    dims = tuple(dimensions)
    return [parse_labels(t, dims) for t in items]


def canonical(labels: Mapping[str, str]) -> str:
    """The canonical text of a label set: sorted `dim=value` joined by commas."""
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))


def matches(workload: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    """Subset match: the workload has every label of the selector."""
    return all(workload.get(k) == v for k, v in selector.items())


def set_name(selector: Mapping[str, str]) -> str:
    """A stable nftables-safe identifier for a selector's membership set."""
    digest = hashlib.sha256(canonical(selector).encode()).hexdigest()
    return "ls_" + digest[:16]


def parse_block(text: str) -> str:
    """One address block, `203.0.113.0/24` or `2001:db8::/32` (a bare address is
    its /32 or /128). Strict: host bits must be zero (`10.0.0.1/24` is refused,
    not rounded). Returns the canonical text."""
    t = text.strip()
    if not t.isascii() or "%" in t:
        raise InvalidInput(f"invalid address block {text[:64]!r}: expected a CIDR")
    try:
        net = ipaddress.ip_network(t, strict=True)
    except ValueError as e:
        raise InvalidInput(f"invalid address block {text[:64]!r}: {e}") from None
    return str(net)


def parse_blocks(texts: Iterable[str]) -> list[str]:
    """Validated blocks in canonical text, deduplicated, IPv4 first, in order."""
    nets = {ipaddress.ip_network(parse_block(t)) for t in texts}
    return [str(n) for n in sorted(nets, key=lambda n: (n.version, n))]


def sorted_blocks(blocks: Iterable[str]) -> list[str]:
    """The set elements for `blocks`: overlapping and adjacent blocks merged (an
    interval set refuses overlaps), IPv4 first, in order."""
    nets = [ipaddress.ip_network(b) for b in blocks]
    v4 = ipaddress.collapse_addresses(n for n in nets if n.version == 4)
    v6 = ipaddress.collapse_addresses(n for n in nets if n.version == 6)
    return [str(n) for n in (*v4, *v6)]


def ip_set_name(blocks: Iterable[str]) -> str:
    """A stable nftables-safe identifier for the set of a rule side's blocks."""
    digest = hashlib.sha256(",".join(sorted_blocks(blocks)).encode()).hexdigest()
    return "ip_" + digest[:16]


def parse_service(text: str) -> Service:
    """Parse `tcp/5432`, `udp/53`, `tcp/8000-8100` or `icmp`."""
    t = text.strip().lower()
    if t == "icmp":
        return Service("icmp")
    proto, sep, ports = t.partition("/")
    if not sep or proto not in ("tcp", "udp"):
        raise InvalidInput(
            f"invalid service {text!r}: expected tcp/PORT, udp/PORT, tcp/LOW-HIGH or icmp"
        )
    lo_s, dash, hi_s = ports.partition("-")
    # ASCII digits only: int() would also take "٨٠", "+80", " 80" and "8_0".
    if not all(p.isascii() and p.isdigit() for p in ((lo_s, hi_s) if dash else (lo_s,))):
        raise InvalidInput(f"invalid port in service {text!r}")
    lo = int(lo_s)
    hi = int(hi_s) if dash else lo
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535) or lo > hi:
        raise InvalidInput(f"invalid port range in service {text!r}: 1-65535, low <= high")
    return Service(proto, lo, hi)  # type: ignore[arg-type]


def parse_services(texts: Iterable[str]) -> list[Service]:
    out = sorted({parse_service(t) for t in texts})
    if not out:
        raise InvalidInput("at least one service is required")
    return out


def validate_options(options: Iterable[str]) -> list[str]:
    out = sorted(set(options))
    for o in out:
        if o not in RULE_OPTIONS:
            raise InvalidInput(
                f"unknown rule option {o!r} (known: {', '.join(sorted(RULE_OPTIONS))})"
            )
    return out
