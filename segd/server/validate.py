"""Checks on API input beyond types: names, label sets, services, bounds.

msgspec refuses wrong shapes and types and the bounds the wire types state with
`msgspec.Meta` (counts, lengths, numeric ranges); this module refuses the other
wrong *values* (names, label sets, services, addresses, free text, what depends
on another field or on configuration) with a message that names the field.
Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable

from segd import policy, wire
from segd.contract import CONTAINER_ID_RE as CONTAINER_ID_RE
from segd.contract import HOSTNAME_RE as HOSTNAME_RE
from segd.contract import NAME_RE as NAME_RE
from segd.errors import InvalidInput

EVENT_RE = re.compile(r"^[a-z][a-z0-9_.]{0,63}\Z")

MAX_DESCRIPTION = 500
MAX_DETAIL = 2000
MAX_SELECTORS = 64
MAX_WORKLOAD_NAME = 255
MAX_SIDECARS = 1024
# stated by the wire types (`msgspec.Meta`), checked when a body is decoded
MAX_USES = wire.MAX_USES
MAX_LIFESPAN_S = wire.MAX_LIFESPAN_S
MAX_CODE_LIFESPAN_S = wire.MAX_CODE_LIFESPAN_S
MAX_SERVICES = wire.MAX_SERVICES
MAX_IPS = wire.MAX_IPS
MAX_PAIRING_KEY = wire.MAX_PAIRING_KEY


def text(field: str, value: str, limit: int) -> str:
    """Free text an admin's terminal will show: printable characters only, so no
    control characters (C0, DEL, C1), bidirectional overrides or other format
    characters that could make one thing look like another."""
    if len(value) > limit:
        raise InvalidInput(f"{field}: longer than {limit} characters")
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise InvalidInput(
            f"{field}: control, bidirectional and other non-printable characters "
            f"(here U+{ord(bad):04X}) are not allowed"
        )
    return value


def name(field: str, value: str) -> str:
    if not NAME_RE.match(value):
        raise InvalidInput(
            f"{field}: invalid name {value!r}: use letters, digits, '_', '.', '-', max 63"
        )
    return value


def bounded(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidInput(f"{field}: must be between {low} and {high}")
    return value


def max_uses(value: int | None) -> int | None:
    """How many new containers a key admits; None is unlimited."""
    return None if value is None else bounded("max_uses", value, 1, MAX_USES)


def selectors(
    field: str, value: policy.Selectors, dims: Iterable[str], *, with_blocks: bool = False
) -> policy.Selectors:
    """A rule side's label sets; an empty list only beside address blocks."""
    if value == "any":
        if with_blocks:
            raise InvalidInput(f"{field}: 'any' cannot be combined with address blocks")
        return "any"
    if not value and not with_blocks:
        raise InvalidInput(f"{field}: at least one label set, address block, or 'any' is required")
    if len(value) > MAX_SELECTORS:
        raise InvalidInput(f"{field}: at most {MAX_SELECTORS} label sets")
    out: list[policy.Labels] = []
    seen: set[str] = set()
    for sel in value:
        try:
            labels = policy.validate_labels(sel, dims)
        except InvalidInput as e:
            raise InvalidInput(f"{field}: {e.message}") from None
        key = policy.canonical(labels)
        if key not in seen:
            seen.add(key)
            out.append(labels)
    return out


def rule(rin: wire.RuleIn, dims: Iterable[str], rule_id: str, now: float) -> wire.Rule:
    """A validated, normalised rule from an API request."""
    dims = tuple(dims)
    try:
        services = [str(s) for s in policy.parse_services(rin.services)]
        options = policy.validate_options(rin.options)
    except InvalidInput as e:
        field = "options" if "option" in e.message else "services"
        raise InvalidInput(f"{field}: {e.message}") from None
    provider_ips = blocks("provider_ips", rin.provider_ips)
    consumer_ips = blocks("consumer_ips", rin.consumer_ips)
    out = wire.Rule(
        id=rule_id,
        providers=selectors("providers", rin.providers, dims, with_blocks=bool(provider_ips)),
        consumers=selectors("consumers", rin.consumers, dims, with_blocks=bool(consumer_ips)),
        services=services,
        options=options,
        description=text("description", rin.description, MAX_DESCRIPTION),
        created_at=now,
        provider_ips=provider_ips,
        consumer_ips=consumer_ips,
    )
    if policy.ENCRYPTED in options:
        if provider_ips or consumer_ips:
            raise InvalidInput(
                "options: an encrypted rule cannot have address blocks (ip: peers): their"
                " traffic does not come through the mesh"
            )
        if "any" in (out.providers, out.consumers):
            raise InvalidInput(
                "options: an encrypted rule cannot have 'any' on a side: it would admit"
                " addresses outside the mesh"
            )
    return out


def blocks(field: str, value: list[str]) -> list[str]:
    """A rule side's address blocks, canonical (strict CIDR: host bits zero)."""
    try:
        return policy.parse_blocks(value)
    except InvalidInput as e:
        raise InvalidInput(f"{field}: {e.message}") from None


def profile(pin: wire.ProfileIn, dims: Iterable[str], profile_id: str, now: float) -> wire.Profile:
    """A validated profile from an API request."""
    try:
        labels = policy.validate_labels(pin.labels, dims)
    except InvalidInput as e:
        raise InvalidInput(f"labels: {e.message}") from None
    locked = sorted(set(pin.locked))
    for d in locked:
        if d not in labels:
            raise InvalidInput(f"locked: dimension {d!r} is not in the profile's labels")
    return wire.Profile(
        id=profile_id,
        name=name("name", pin.name),
        labels=labels,
        locked=locked,
        max_uses=pin.max_uses,
        lifespan_s=pin.lifespan_s,
        on_mismatch=pin.on_mismatch,
        enabled=pin.enabled,
        description=text("description", pin.description, MAX_DESCRIPTION),
        created_at=now,
        mode=pin.mode,
        visibility=pin.visibility,
    )


# First octets the full check looks at: 0 (unspecified), 127 (loopback), multicast.
_FULL_CHECK_IPV4 = frozenset(range(224, 240)) | {0, 127}


def _plain_ipv4(v: str) -> bool:
    """True when `v` is a dotted quad in canonical form whose first octet cannot
    make it anything but a workload address; for anything else the full check
    (`ipaddress`) decides."""
    try:
        packed = socket.inet_pton(socket.AF_INET, v)
    except (OSError, ValueError, TypeError):
        return False
    return packed[0] not in _FULL_CHECK_IPV4 and socket.inet_ntop(socket.AF_INET, packed) == v


def ips(value: list[str]) -> list[str]:
    """Validated, normalised (compressed), sorted and unique IP addresses (their
    count is bounded by `wire.PairIn`)."""
    out: set[str] = set()
    for v in value:
        if _plain_ipv4(v):
            out.add(v)
            continue
        try:
            addr = ipaddress.ip_address(v)
        except ValueError:
            raise InvalidInput(f"ips: invalid IP address {v!r}") from None
        if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
            raise InvalidInput(f"ips: {v!r} cannot be a workload address")
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
            # Peers render it into nft sets, which refuse `fe80::1%eth0`.
            raise InvalidInput(f"ips: {v!r}: a scoped address cannot be a workload address")
        out.add(str(addr))
    return sorted(out)


def pair_in(p: wire.PairIn) -> wire.PairIn:
    """Shape checks of a pairing request; label values are judged by the pairing."""
    container_id(p.container_id)
    text("name", p.name, MAX_WORKLOAD_NAME)
    return wire.PairIn(
        container_id=p.container_id,
        pairing_key=p.pairing_key,
        ips=ips(p.ips),
        name=p.name,
        requested_labels=p.requested_labels,
    )


def container_id(value: str, field: str = "container_id") -> str:
    if not CONTAINER_ID_RE.match(value):
        raise InvalidInput(f"{field}: invalid container id {value!r}")
    return value


def sidecars(s: wire.SidecarsIn) -> list[wire.SidecarIn]:
    """A host's sidecars: each once, none sharing its own namespace; sorted."""
    if len(s.sidecars) > MAX_SIDECARS:
        raise InvalidInput(f"sidecars: at most {MAX_SIDECARS}")
    seen: dict[str, wire.SidecarIn] = {}
    for i, c in enumerate(s.sidecars):
        container_id(c.container_id, f"sidecars[{i}].container_id")
        container_id(c.shares, f"sidecars[{i}].shares")
        text(f"sidecars[{i}].name", c.name, MAX_WORKLOAD_NAME)
        if c.shares == c.container_id:
            raise InvalidInput(f"sidecars[{i}]: a container cannot share its own namespace")
        if c.container_id in seen:
            raise InvalidInput(f"sidecars[{i}]: container {c.container_id!r} listed twice")
        seen[c.container_id] = c
    return [seen[k] for k in sorted(seen)]


def hostname(value: str) -> str:
    if not HOSTNAME_RE.match(value):
        raise InvalidInput(f"hostname: invalid hostname {value!r}")
    return value


def report(r: wire.AgentReport) -> wire.AgentReport:
    if not EVENT_RE.match(r.event):
        raise InvalidInput(f"event: invalid event name {r.event!r}: use [a-z][a-z0-9_.]*")
    if r.container_id:
        container_id(r.container_id)
    text("detail", r.detail.replace("\n", " "), MAX_DETAIL)
    return r
