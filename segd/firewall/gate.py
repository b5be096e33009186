"""The host gate: container IPs on Docker bridges stay dark until enforced (pure).

A container's process runs a few milliseconds before Docker reports it, and a
container with CAP_NET_ADMIN can flush its own table, so rules inside the
container's namespace are not enough. The gate is one table in the host
namespace, `bridge segd_gate`: frames whose IP source (coming in from a `veth*`
bridge port) or destination (going out to a `veth*` port) lies in a Docker
bridge subnet (`subnets4`/`subnets6`) and is not in `allowed4`/`allowed6` are
dropped. The agent adds an IP only after its container's own table is in place.
The table is plain kernel state: it keeps failing closed while the agent is down.

Measured on kernel 6.18 / nftables 1.0.6 (bridge family, priority -200, which
nft lists as `priority filter`; no br_netfilter needed; ARP is not matched):

- `forward` sees container <-> container frames on the same bridge, with
  iifname/oifname the two veth ports.
- `input` sees frames a container sends to the bridge's own address *and*
  frames routed via the host to the outside (their destination MAC is the
  bridge's); iifname is the veth port.
- `output` sees frames the host sends to a container, including traffic the
  host routes in from another interface; oifname is the veth port.
- Deleting and re-creating the table lets frames through while it commits,
  even behind a shadow copy (`render.transactions`), which is enough for the
  accept-only container tables. Flood from an unenforced IP, gate replaced in
  a loop: ~1,500 of 383,000 frames got through over 2,000 replaces. (Unlike
  the container tables, the gate drops on a *match* in `subnets4`, a set that
  the replace creates anew.) Rewriting in place (keep the table, its sets and
  chains; flush and refill the sets, flush and re-add the rules, in one
  transaction): 0 of 378,000 over 3,900 rebuilds. So `render_gate` rewrites in
  place; the replace is only the fallback for a table whose structure is not
  ours.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from segd.firewall.render import elements_block, split_addrs

GATE_TABLE = "segd_gate"
GATE = f"bridge {GATE_TABLE}"
LIST_GATE = f"list table {GATE}"
PORTS = "veth*"

_Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def split_subnets(texts: Iterable[str]) -> tuple[list[str], list[str]]:
    """Validate, normalise and merge subnets; return (ipv4, ipv6) texts."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for t in texts:
        if not isinstance(t, str):
            raise ValueError(f"invalid subnet {t!r}")
        try:
            net: _Net = ipaddress.ip_network(t, strict=False)
        except ValueError:
            raise ValueError(f"invalid subnet {t!r}") from None
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    return (
        [str(n) for n in ipaddress.collapse_addresses(v4)],
        [str(n) for n in ipaddress.collapse_addresses(v6)],
    )


def _set(name: str, family: str, elements: list[str], interval: bool) -> list[str]:
    return [
        f"\tset {name} {{",
        f"\t\ttype {family}",
        *(["\t\tflags interval"] if interval else []),
        *elements_block(elements, "\t\t"),
        "\t}",
    ]


def _drops(direction: str) -> list[str]:
    port, side = ("iifname", "saddr") if direction == "in" else ("oifname", "daddr")
    return [
        f'{port} "{PORTS}" ip {side} @subnets4 ip {side} != @allowed4 drop',
        f'{port} "{PORTS}" ip6 {side} @subnets6 ip6 {side} != @allowed6 drop',
    ]


def _chain(hook: str, lines: list[str]) -> list[str]:
    return [
        f"\tchain {hook} {{",
        f"\t\ttype filter hook {hook} priority -200; policy accept;",
        *(f"\t\t{line}" for line in lines),
        "\t}",
    ]


def _declarations() -> list[str]:
    """The table's sets and chains, empty; adding them again changes nothing."""
    return [
        *_set("allowed4", "ipv4_addr", [], False),
        *_set("allowed6", "ipv6_addr", [], False),
        *_set("subnets4", "ipv4_addr", [], True),
        *_set("subnets6", "ipv6_addr", [], True),
        *_chain("forward", []),
        *_chain("input", []),
        *_chain("output", []),
    ]


def _rules() -> list[str]:
    ins, outs = _drops("in"), _drops("out")
    hooks = (("forward", ins + outs), ("input", ins), ("output", outs))
    return [f"add rule {GATE} {hook} {rule}" for hook, rules in hooks for rule in rules]


def _fill(name: str, elements: list[str]) -> list[str]:
    return [f"add element {GATE} {name} {{ {', '.join(elements)} }}"] if elements else []


def render_gate(allowed: Iterable[str], subnets: Iterable[str]) -> str:
    """The whole gate, rewritten in place in one transaction (created if absent).

    The table, its sets and chains are kept; rules and set contents are
    replaced. Fails (changing nothing) if the table exists with other set or
    chain definitions: then use `render_gate_replace`.
    """
    a4, a6 = split_addrs(allowed)
    s4, s6 = split_subnets(subnets)
    lines = [f"table {GATE} {{", *_declarations(), "}", f"flush table {GATE}"]
    for name, elements in (("allowed4", a4), ("allowed6", a6), ("subnets4", s4), ("subnets6", s6)):
        lines += [f"flush set {GATE} {name}", *_fill(name, elements)]
    return "\n".join([*lines, *_rules()]) + "\n"


def render_gate_replace(allowed: Iterable[str], subnets: Iterable[str]) -> str:
    """The whole gate as a delete-and-create replace (apply via `transactions`)."""
    a4, a6 = split_addrs(allowed)
    s4, s6 = split_subnets(subnets)
    body = [
        *_set("allowed4", "ipv4_addr", a4, False),
        *_set("allowed6", "ipv6_addr", a6, False),
        *_set("subnets4", "ipv4_addr", s4, True),
        *_set("subnets6", "ipv6_addr", s6, True),
        *_chain("forward", _drops("in") + _drops("out")),
        *_chain("input", _drops("in")),
        *_chain("output", _drops("out")),
    ]
    head = [f"add table {GATE}", f"delete table {GATE}", f"table {GATE} {{"]
    return "\n".join([*head, *body, "}"]) + "\n"


def render_gate_add(ips: Iterable[str]) -> str | None:
    """Let these IPs through (idempotent); None when there are none."""
    a4, a6 = split_addrs(ips)
    lines = [
        f"add element {GATE} {name} {{ {', '.join(addrs)} }}"
        for name, addrs in (("allowed4", a4), ("allowed6", a6))
        if addrs
    ]
    return "\n".join(lines) + "\n" if lines else None


def render_gate_remove(ips: Iterable[str]) -> str | None:
    """Stop letting these IPs through; None when there are none.

    nftables 1.0.6 has no `destroy element`, and deleting an absent element
    fails the transaction, so each element is added then deleted in the same
    transaction: the result is "absent" whether or not it was there.
    """
    a4, a6 = split_addrs(ips)
    lines: list[str] = []
    for name, addrs in (("allowed4", a4), ("allowed6", a6)):
        if addrs:
            elems = ", ".join(addrs)
            lines += [
                f"add element {GATE} {name} {{ {elems} }}",
                f"delete element {GATE} {name} {{ {elems} }}",
            ]
    return "\n".join(lines) + "\n" if lines else None


def render_gate_subnets(subnets: Iterable[str]) -> str:
    """Replace the guarded subnets in one transaction."""
    s4, s6 = split_subnets(subnets)
    lines = [f"flush set {GATE} subnets4", f"flush set {GATE} subnets6"]
    lines += [
        f"add element {GATE} {name} {{ {', '.join(nets)} }}"
        for name, nets in (("subnets4", s4), ("subnets6", s6))
        if nets
    ]
    return "\n".join(lines) + "\n"
