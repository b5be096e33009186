"""Render a workload's management instructions as nftables script text (pure).

One container network namespace holds one table, `inet segd`: a pair of named
sets (`<set>_v4`, `<set>_v6`) per peer label set the workload's allows refer
to, and `input`/`output` chains with policy drop. Loopback, established and
related traffic and IPv6 neighbour discovery are always accepted; every other
accept comes from one rule and one service, and carries the rule id as a
comment. A peer joining or leaving is a set element change, never a rule
rewrite.

Every identifier and address that reaches the text is validated here: a set
name, rule id, port or IP that does not have the expected shape raises
`ValueError`, so nothing from the wire can reach nft unescaped. Output is
deterministic: the same input gives the same bytes. `transactions` says how a
whole-table replace is applied without a gap.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from segd.policy import Service
from segd.wire import Allow, Rule, WorkloadPolicy

TABLE = "segd"
LIST_TABLE = f"list table inet {TABLE}"
SHADOW_SUFFIX = "_shadow"

SET_NAME_RE = re.compile(r"^ls_[0-9a-f]{16}\Z")
RULE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")

Addr = ipaddress.IPv4Address | ipaddress.IPv6Address
Direction = Literal["in", "out"]

_ND_IN = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept"
_ND_OUT = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept"


# ---- validation ----------------------------------------------------------------------


def check_set_name(name: object) -> str:
    if not isinstance(name, str) or not SET_NAME_RE.match(name):
        raise ValueError(f"invalid set name {name!r}")
    return name


def check_rule_id(rule_id: object) -> str:
    if not isinstance(rule_id, str) or not RULE_ID_RE.match(rule_id):
        raise ValueError(f"invalid rule id {rule_id!r}")
    return rule_id


def check_addr(text: object) -> Addr:
    """One IPv4 or IPv6 host address; scoped IPv6 (`fe80::1%eth0`) is refused."""
    if not isinstance(text, str):
        raise ValueError(f"invalid IP address {text!r}")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"invalid IP address {text!r}") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        raise ValueError(f"invalid IP address {text!r}: scoped addresses are not allowed")
    return addr


def split_addrs(texts: Iterable[str]) -> tuple[list[str], list[str]]:
    """Validate, deduplicate and sort addresses; return (ipv4, ipv6) texts."""
    v4: set[ipaddress.IPv4Address] = set()
    v6: set[ipaddress.IPv6Address] = set()
    for t in texts:
        addr = check_addr(t)
        if isinstance(addr, ipaddress.IPv4Address):
            v4.add(addr)
        else:
            v6.add(addr)
    return [str(a) for a in sorted(v4)], [str(a) for a in sorted(v6)]


def _ports(svc: Service) -> str:
    for p in (svc.port, svc.port_end):
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            raise ValueError(f"invalid port in service {svc!r}")
    if svc.port > svc.port_end:
        raise ValueError(f"invalid port range in service {svc!r}")
    return str(svc.port) if svc.port == svc.port_end else f"{svc.port}-{svc.port_end}"


def _service_matches(svc: Service) -> tuple[str, str]:
    """The (ipv4, ipv6) match text for one service."""
    if svc.proto == "icmp":
        return "meta l4proto icmp", "meta l4proto ipv6-icmp"
    if svc.proto in ("tcp", "udp"):
        m = f"{svc.proto} dport {_ports(svc)}"
        return m, m
    raise ValueError(f"invalid protocol in service {svc!r}")


# ---- rendering -----------------------------------------------------------------------


def elements_block(addrs: Sequence[str], indent: str) -> list[str]:
    return [f"{indent}elements = {{ {', '.join(addrs)} }}"] if addrs else []


def set_block(name: str, typ: str, elements: Sequence[str], interval: bool = False) -> list[str]:
    """A named set definition inside a `table { ... }` block."""
    return [
        f"\tset {name} {{",
        f"\t\ttype {typ}",
        *(["\t\tflags interval"] if interval else []),
        *elements_block(elements, "\t\t"),
        "\t}",
    ]


def allow_rules(allow: Allow, direction: Direction, log: bool) -> list[str]:
    """The rule lines for one allow, one per service and address family."""
    rule_id = check_rule_id(allow.rule_id)
    tail = f'log prefix "segd:{rule_id} " accept' if log else "accept"
    tail += f' comment "{rule_id}"'
    side = "saddr" if direction == "in" else "daddr"
    peer = None if allow.peer is None else check_set_name(allow.peer)
    out: list[str] = []
    for svc in sorted(set(allow.services)):
        m4, m6 = _service_matches(svc)
        if peer is None and m4 == m6:
            out.append(f"{m4} {tail}")
        elif peer is None:
            out += [f"{m4} {tail}", f"{m6} {tail}"]
        else:
            out += [
                f"ip {side} @{peer}_v4 {m4} {tail}",
                f"ip6 {side} @{peer}_v6 {m6} {tail}",
            ]
    return out


def _chain(name: str, hook: str, lines: Sequence[str]) -> list[str]:
    return [
        f"\tchain {name} {{",
        f"\t\ttype filter hook {hook} priority filter; policy drop;",
        *(f"\t\t{line}" for line in lines),
        "\t}",
    ]


def _drop(family: str, name: str) -> str:
    return f"add table {family} {name}\ndelete table {family} {name}\n"


def _table(body: Sequence[str]) -> str:
    head = [f"add table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    return "\n".join([*head, *body, "}"]) + "\n"


def referenced_sets(policy: WorkloadPolicy) -> set[str]:
    """The peer set names the workload's allows refer to (validated)."""
    allows = [*policy.inbound, *policy.outbound]
    return {check_set_name(a.peer) for a in allows if a.peer is not None}


def log_rules(rules: Iterable[Rule]) -> frozenset[str]:
    """Ids of the rules whose accepts should be logged (rule option `log`)."""
    return frozenset(r.id for r in rules if "log" in r.options)


def _allow_order(a: Allow) -> tuple[str, bool, str, list[Service]]:
    """A total order on allows (a rule may have `peer=None` and named peers)."""
    return (a.rule_id, a.peer is not None, a.peer or "", a.services)


def render_workload(
    policy: WorkloadPolicy,
    sets: Mapping[str, Sequence[str]],
    log_rules: frozenset[str] = frozenset(),
) -> str:
    """The whole `inet segd` table for one workload, as one atomic replace.

    A referenced set missing from `sets` is rendered empty (fail closed).
    """
    body: list[str] = []
    for name in sorted(referenced_sets(policy)):
        v4, v6 = split_addrs(sets.get(name, ()))
        body += set_block(f"{name}_v4", "ipv4_addr", v4)
        body += set_block(f"{name}_v6", "ipv6_addr", v6)

    def chain_lines(allows: Sequence[Allow], direction: Direction) -> list[str]:
        lines: list[str] = []
        for allow in sorted(allows, key=_allow_order):
            lines += allow_rules(allow, direction, allow.rule_id in log_rules)
        return lines

    base = ["ct state established,related accept", "ct state invalid drop"]
    inbound = chain_lines(policy.inbound, "in")
    outbound = chain_lines(policy.outbound, "out")
    body += _chain("input", "input", ['iif "lo" accept', *base, _ND_IN, *inbound])
    body += _chain("output", "output", ['oif "lo" accept', *base, _ND_OUT, *outbound])
    return _table(body)


def render_isolation() -> str:
    """The `inet segd` table that drops everything but loopback."""
    body = _chain("input", "input", ['iif "lo" accept'])
    body += _chain("output", "output", ['oif "lo" accept'])
    return _table(body)


def render_removal() -> str:
    """Remove the `inet segd` table (and any shadow) whether or not it exists."""
    return _drop("inet", TABLE) + _drop("inet", TABLE + SHADOW_SUFFIX)


def set_structure_key(policy: WorkloadPolicy, log_rules: frozenset[str] = frozenset()) -> str:
    """Everything in the table but set elements: equal keys -> a delta is enough."""
    return render_workload(policy, {}, log_rules)


def element_lines(verb: str, table: str, name: str, addrs: Sequence[str]) -> list[str]:
    """`add`/`delete element` on the set `table name`; nothing for no elements."""
    return [f"{verb} element {table} {name} {{ {', '.join(addrs)} }}"] if addrs else []


def render_set_delta(
    old: Mapping[str, Sequence[str]],
    new: Mapping[str, Sequence[str]],
    referenced: Iterable[str],
) -> str | None:
    """Element add/delete lines turning `old` into `new` for the referenced sets.

    One script (one transaction); None when nothing changed. Deletes come first.
    """
    dels: list[str] = []
    adds: list[str] = []
    for name in sorted({check_set_name(n) for n in referenced}):
        old4, old6 = split_addrs(old.get(name, ()))
        new4, new6 = split_addrs(new.get(name, ()))
        for fam, before, after in (("v4", old4, new4), ("v6", old6, new6)):
            keep_after, keep_before = set(after), set(before)
            gone = [a for a in before if a not in keep_after]
            came = [a for a in after if a not in keep_before]
            dels += element_lines("delete", f"inet {TABLE}", f"{name}_{fam}", gone)
            adds += element_lines("add", f"inet {TABLE}", f"{name}_{fam}", came)
    if not dels and not adds:
        return None
    return "\n".join(dels + adds) + "\n"


_REPLACE_RE = re.compile(
    r"add table (?P<family>inet|bridge) (?P<name>[a-z_]+)\n"
    r"delete table (?P=family) (?P=name)\n"
    r"table (?P=family) (?P=name) (?=\{\n)"
)


def transactions(script: str, *, shadow_first: bool = False) -> list[str]:
    """The nft transactions that apply `script` with no moment of lesser enforcement.

    Measured on kernel 6.18 / nftables 1.0.6: deleting and re-creating a table
    under the *same name* in one transaction lets packets through that table
    while the transaction commits (about 1 packet in 130 of a flood, over
    thousands of replaces). Other tables keep enforcing, and a table created
    under a new name enforces from its commit on. So a whole-table replace of T
    becomes three transactions: drop `T_shadow`; create `T_shadow` with the new
    contents *and* replace T; drop `T_shadow`. The switch from old to new rules
    still happens in one commit; until the last step a packet must pass both
    copies of the new rules. Any other script is one transaction, as given.

    That is enough for tables that only accept (policy drop). A table that
    drops on a *match* in one of its sets (the host gate) also leaks through a
    shadow created in the same transaction as the replace: `shadow_first`
    commits the shadow in a transaction of its own first, so four
    transactions: drop `T_shadow`; create it; replace T; drop it.
    """
    m = _REPLACE_RE.match(script)
    if m is None:
        return [script]
    family, name = m["family"], m["name"]
    shadow = name + SHADOW_SUFFIX
    drop = _drop(family, shadow)
    copy = f"table {family} {shadow} {script[m.end() :]}"
    if shadow_first:
        return [drop, copy, script, drop]
    return [drop, f"{copy}{script}", drop]
