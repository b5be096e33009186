"""A small nftables for one network namespace: it reads the nft text segd's plans
contain, keeps tables, sets, elements and chains, and refuses what nft refuses
(a delete of something absent, a rule on a set that does not exist, a set
redefined with another type, ...), each script as one transaction.

Enough to run the agent against, not a general nft: only the statements the
renderers write are understood, and anything else is refused loudly, so a
renderer that starts writing something new fails here first.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from dataclasses import dataclass, field

from segd.firewall.kernel import NftError

ENOENT = "Error: Could not process rule: No such file or directory"
EEXIST = "Error: Could not process rule: File exists"
EBUSY = "Error: Could not process rule: Device or resource busy"


@dataclass
class NftSet:
    type: str
    interval: bool = False
    elements: list[str] = field(default_factory=list)


@dataclass
class Chain:
    head: str  # "type filter hook input priority filter; policy drop;" ("" for a regular chain)
    rules: list[str] = field(default_factory=list)


@dataclass
class NftTable:
    sets: dict[str, NftSet] = field(default_factory=dict)
    chains: dict[str, Chain] = field(default_factory=dict)

    def listing(self, name: str) -> str:
        out = [f"table {name} {{"]
        for sname, s in self.sets.items():
            out += [f"\tset {sname} {{", f"\t\ttype {s.type}"]
            if s.interval:
                out.append("\t\tflags interval")
            if s.elements:
                out.append(f"\t\telements = {{ {', '.join(s.elements)} }}")
            out.append("\t}")
        for cname, c in self.chains.items():
            out.append(f"\tchain {cname} {{")
            if c.head:
                out.append(f"\t\t{c.head}")
            out += [f"\t\t{r}" for r in c.rules]
            out.append("\t}")
        out.append("}")
        return "\n".join(out) + "\n"


_ELEMS = re.compile(r"^\{ (.*) \}$")
_SET_REF = re.compile(r"@(\w+)")


def _elements(text: str) -> list[str]:
    m = _ELEMS.match(text.strip())
    if not m:
        raise NftError(f"Error: syntax error, unexpected elements {text!r}")
    return [e.strip() for e in m.group(1).split(",") if e.strip()]


class Ruleset:
    """The tables of one namespace, keyed by "family name"."""

    def __init__(self) -> None:
        self.tables: dict[str, NftTable] = {}
        self.transactions = 0

    def run(self, script: str) -> None:
        """One transaction: all of `script`, or (NftError) nothing."""
        work = copy.deepcopy(self.tables)
        lines = script.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i].strip()
            i += 1
            if not line:
                continue
            if line.startswith("table ") and line.endswith("{"):
                depth, body = 1, []
                while depth:
                    if i >= len(lines):
                        raise NftError("Error: syntax error, unexpected end of file")
                    inner = lines[i].strip()
                    i += 1
                    depth += inner.endswith("{") - (inner == "}")
                    if depth:
                        body.append(inner)
                _block(work, line[len("table ") : -1].strip(), body)
            else:
                _statement(work, line)
        self.tables = work
        self.transactions += 1

    def listing(self, table: str) -> str | None:
        t = self.tables.get(table)
        return None if t is None else t.listing(table)


def _table(work: dict[str, NftTable], name: str) -> NftTable:
    t = work.get(name)
    if t is None:
        raise NftError(ENOENT)
    return t


def _block(work: dict[str, NftTable], name: str, body: list[str]) -> None:
    """`table F N { ... }`: declares what is missing, adds to what is there."""
    t = work.setdefault(name, NftTable())
    i = 0
    while i < len(body):
        line = body[i]
        i += 1
        kind, _, rest = line.partition(" ")
        if kind not in ("set", "chain") or not rest.endswith("{"):
            raise NftError(f"Error: syntax error, unexpected {line!r}")
        inner: list[str] = []
        while body[i] != "}":
            inner.append(body[i])
            i += 1
        i += 1
        obj = rest[:-1].strip()
        if kind == "set":
            typ = next(x[5:] for x in inner if x.startswith("type "))
            interval = "flags interval" in inner
            elems = [e for x in inner if x.startswith("elements = ") for e in _elements(x[11:])]
            s = t.sets.get(obj)
            if s is None:
                t.sets[obj] = NftSet(typ, interval, [])
            elif s.type != typ or s.interval != interval:
                raise NftError(EEXIST)
            _add(t.sets[obj], elems)
        else:
            head = inner[0] if inner and inner[0].startswith("type ") else ""
            rules = inner[1:] if head else inner
            c = t.chains.get(obj)
            if c is None:
                t.chains[obj] = Chain(head)
            elif c.head != head:
                raise NftError(EEXIST)
            for r in rules:
                _add_rule(t, obj, r)


def _add(s: NftSet, elems: list[str]) -> None:
    for e in elems:
        if e not in s.elements:
            s.elements.append(e)


def _add_rule(t: NftTable, chain: str, rule: str) -> None:
    for ref in _SET_REF.findall(rule):
        if ref not in t.sets:
            raise NftError(ENOENT)
    if chain not in t.chains:
        raise NftError(ENOENT)
    t.chains[chain].rules.append(rule)


def _statement(work: dict[str, NftTable], line: str) -> None:  # noqa: C901 - one branch per nft statement kind
    words = line.split(" ")
    verb, what = words[0], words[1] if len(words) > 1 else ""
    name = " ".join(words[2:4])
    match verb, what:
        case "add", "table":
            work.setdefault(name, NftTable())
        case "delete", "table":
            _table(work, name)
            del work[name]
        case "flush", "table":
            for c in _table(work, name).chains.values():
                c.rules.clear()
        case "add", "set":
            t = _table(work, name)
            typ = re.search(r"\{ type ([^;]+); \}", line)
            if typ is None:
                raise NftError(f"Error: syntax error in {line!r}")
            s = t.sets.get(words[4])
            if s is None:
                t.sets[words[4]] = NftSet(typ.group(1))
            elif s.type != typ.group(1):
                raise NftError(EEXIST)
        case "delete", "set":
            t = _table(work, name)
            if words[4] not in t.sets:
                raise NftError(ENOENT)
            if any(f"@{words[4]}" in r.split() for c in t.chains.values() for r in c.rules):
                raise NftError(EBUSY)
            del t.sets[words[4]]
        case "flush", "set":
            s = _table(work, name).sets.get(words[4])
            if s is None:
                raise NftError(ENOENT)
            s.elements.clear()
        case (("add" | "delete"), "element"):
            s = _table(work, name).sets.get(words[4])
            if s is None:
                raise NftError(ENOENT)
            elems = _elements(" ".join(words[5:]))
            if verb == "add":
                _add(s, elems)
            else:
                for e in elems:
                    if e not in s.elements:
                        raise NftError(ENOENT)
                    s.elements.remove(e)
        case "add", "rule":
            _add_rule(_table(work, name), words[4], " ".join(words[5:]))
        case _:
            raise NftError(f"Error: syntax error, unexpected {verb} {what}")


# ---- would this packet pass? ----------------------------------------------------------


_RULE = re.compile(
    r"^(?:(?P<fam>ip6?) (?P<side>saddr|daddr) @(?P<set>\w+) )?"
    r"(?:(?P<proto>tcp|udp) dport (?P<lo>\d+)(?:-(?P<hi>\d+))?|meta l4proto (?P<l4>[\w-]+))"
    r"(?: log (?:group \d+ )?prefix \"[^\"]*\")? accept(?: comment \"[^\"]*\")?$"
)


def accepts(t: NftTable | None, chain: str, peer: str, proto: str, port: int) -> bool:
    """Whether a base chain of segd's container table accepts a new connection
    with `peer` (IPv4) on proto/port. No table: nothing filters."""
    if t is None:
        return True
    c = t.chains.get(chain)
    if c is None:
        return True
    for rule in c.rules:
        if rule == "accept":
            return True  # the tail of a chain in visibility mode
        m = _RULE.match(rule)
        if m is not None and _matches(t, m, peer, proto, port):
            return True
    return "policy accept" in c.head


def _matches(t: NftTable, m: re.Match[str], peer: str, proto: str, port: int) -> bool:
    """Whether an accept rule matches (other rules: loopback, conntrack state,
    neighbour discovery, logging drops, never match)."""
    if m["set"] is not None:
        s = t.sets.get(m["set"])
        if m["fam"] != "ip" or s is None or peer not in s.elements:
            return False
    if m["l4"] is not None:
        return bool(m["l4"] == proto)
    lo = int(m["lo"])
    hi = int(m["hi"] or lo)
    return m["proto"] == proto and lo <= port <= hi


def gate_admits(t: NftTable | None, port: str, ip: str) -> bool:
    """Whether the host gate lets frames from/to `ip` through bridge port `port`."""
    if t is None:
        return True
    subnets = t.sets.get("subnets4")
    allowed = t.sets.get("allowed4")
    if subnets is None or allowed is None:
        return True
    inside = any(
        ipaddress.ip_address(ip) in ipaddress.ip_network(n, strict=False) for n in subnets.elements
    )
    return not inside or f'"{port}" . {ip}' in allowed.elements
