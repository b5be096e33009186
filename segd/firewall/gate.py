"""The host gate: container IPs on Docker bridges stay dark until enforced (pure plans).

A container's process runs a few milliseconds before Docker reports it, and a
container with CAP_NET_ADMIN can flush its own table, so rules inside the
container's namespace are not enough. The gate is one table in the host
namespace, `bridge segd_gate`: frames whose IP source (coming in from a `veth*`
bridge port) or destination (going out to a `veth*` port) lies in a Docker
bridge subnet (`subnets4`/`subnets6`) are dropped unless the pair (that port,
that address) is in `allowed4`/`allowed6` (`type ifname . ipv4_addr`). An
entry is the host-side veth name and an address of the container behind it
(`kernel.Firewall.ports` finds the name). The agent adds a container's entries only
after its own table is in place. The table is plain kernel state: it keeps
failing closed while the agent is down. What it drops is logged first,
rate-limited, to NFLOG (`nflog`), read by the agent in the gate's namespace.

Binding each address to its port closes two holes an address-only gate has:
a container with CAP_NET_ADMIN that takes an enforced peer's address, and a
new container that gets a dead one's address while the agent is down (its
veth is new, with a new random name, so the stale pair never matches it).
A port re-created under the *same* name would match a stale entry again;
Docker names host-side veths `veth` + 7 random hex digits.

Measured on kernel 6.18 / nftables 1.0.6 (bridge family, priority -200, which
nft lists as `priority filter`; no br_netfilter needed; ARP is not matched):

- `forward` sees container <-> container frames on the same bridge, with
  iifname/oifname the two veth ports.
- `input` sees frames a container sends to the bridge's own address *and*
  frames routed via the host to the outside (their destination MAC is the
  bridge's); iifname is the veth port.
- `output` sees frames the host sends to a container, including traffic the
  host routes in from another interface; oifname is the veth port.
- Spoofing: a namespace on another port holding an admitted address, UDP
  floods for 0.3 s. Address-only gate: ~27,000 frames reached the peer and
  ~20,000 the bridge address. This gate: 0 of ~6,000-16,000 each way, to the
  peer (forward), to the bridge address (input), and towards the spoofer's
  port with its MAC pinned as the address's neighbour, from the peer
  (forward) and from the host (output); all arrive once (spoofer's port,
  address) is admitted. ARP still crosses, so the spoofer can claim the
  address, but IP frames to or from it on its port are dropped; so is
  neighbour discovery sent from an unadmitted global IPv6 address.
- Reused address: with the agent gone, the namespace behind an admitted
  (veth1, address) was deleted and a new one given the same addresses behind
  veth4: every path to and from it (peer, bridge, routed outside, both
  families) stayed dark until (veth4, address) was added.
- Rewriting in place (keep the table, its sets and chains; flush and refill
  the sets, flush and re-add the rules, in one transaction): 0 of ~530,000
  frames from an unadmitted address over ~3,400-4,000 rebuilds. So
  `render_gate` rewrites in place.
- Deleting and re-creating the table lets frames through while it commits,
  even behind a shadow copy made in the same transaction (`nftext.replace_txs`):
  the gate drops on a *match* in `subnets4`, a set the replace creates anew.
  ~120-550 of 190,000-340,000 frames over ~1,400-2,300 replaces. With the
  shadow committed in a transaction of its own first (`render_gate_replace`):
  0 of 250,000-520,000 over ~1,600-1,800 replaces. The replace is the
  fallback of `render_gate`'s plan, for a table whose structure is not ours,
  such as the address-only gate of earlier versions: on that one the
  in-place rewrite fails on `allowed4` ("Could not process rule: File
  exists") and changes nothing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import NamedTuple

from segd.firewall import nflog, nftext
from segd.firewall.nftext import check_addr
from segd.firewall.plan import Plan, Table, one

GATE_TABLE = "segd_gate"
GATE = Table("bridge", GATE_TABLE)
PORTS = "veth*"
PORT_RE = re.compile(r"^veth[A-Za-z0-9_.@-]{0,11}\Z")
"""A host-side bridge port the gate rules look at: `veth*`, at most 15 bytes (IFNAMSIZ - 1)."""

GATE_PLANS = frozenset({"gate", "gate_replace"})
"""Plans that build the gate whole (after them the gate's log is read)."""

_Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class GateEntry(NamedTuple):
    """One admitted address and the bridge port (host-side veth name) it lives behind."""

    port: str
    ip: str


def check_port(name: object) -> str:
    """A host-side veth name the gate can match; anything else raises ValueError.

    Only `veth*` ports are gated, so an entry for any other name could never
    admit anything: it is refused rather than kept as dead weight (it is most
    likely a container-side name such as `eth0` passed by mistake).
    """
    if not isinstance(name, str) or not PORT_RE.match(name):
        raise ValueError(f"invalid bridge port {name!r}")
    return name


def split_entries(entries: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """Validate, deduplicate and sort (port, ip) pairs; return (ipv4, ipv6) element texts.

    An element reads `"veth1a2b3c4" . 172.17.0.2`; elements sort by address,
    then port.
    """
    v4: set[tuple[ipaddress.IPv4Address, str]] = set()
    v6: set[tuple[ipaddress.IPv6Address, str]] = set()
    for entry in entries:
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise ValueError(f"invalid gate entry {entry!r}: want (port, ip)")
        port, ip = check_port(entry[0]), check_addr(entry[1])
        if isinstance(ip, ipaddress.IPv4Address):
            v4.add((ip, port))
        else:
            v6.add((ip, port))
    return (
        [f'"{port}" . {ip}' for ip, port in sorted(v4)],
        [f'"{port}" . {ip}' for ip, port in sorted(v6)],
    )


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


def _sets(a4: list[str], a6: list[str], s4: list[str], s6: list[str]) -> list[str]:
    return [
        *nftext.set_block("allowed4", "ifname . ipv4_addr", a4),
        *nftext.set_block("allowed6", "ifname . ipv6_addr", a6),
        *nftext.set_block("subnets4", "ipv4_addr", s4, interval=True),
        *nftext.set_block("subnets6", "ipv6_addr", s6, interval=True),
    ]


def _drops(direction: str) -> list[str]:
    """Each drop follows a rate-limited log of the same match: a frame from a
    container's port (`in`) is what that container sent (`out` in its flow
    records), a frame to one (`out`) what it would have received (`in`)."""
    port, side = ("iifname", "saddr") if direction == "in" else ("oifname", "daddr")
    logged = nflog.limited("out" if direction == "in" else "in", "blocked")
    rules: list[str] = []
    for ip, fam in (("ip", "4"), ("ip6", "6")):
        match = f'{port} "{PORTS}" {ip} {side} @subnets{fam} {port} . {ip} {side} != @allowed{fam}'
        rules += [f"{match} {logged}", f"{match} drop"]
    return rules


_HOOKS = (("forward", ("in", "out")), ("input", ("in",)), ("output", ("out",)))
_RULES = {hook: [r for d in directions for r in _drops(d)] for hook, directions in _HOOKS}


def _chains(with_rules: bool) -> list[str]:
    lines: list[str] = []
    for hook, rules in _RULES.items():
        head = f"type filter hook {hook} priority -200; policy accept;"
        lines += nftext.chain_block(hook, head, rules if with_rules else [])
    return lines


_SKELETON = nftext.table_text(GATE, [*_sets([], [], [], []), *_chains(False)])
"""The table, its sets and chains, empty: declares them whether or not they exist."""

_ADD_RULES = [
    line for hook, rules in _RULES.items() for line in nftext.rule_lines(GATE, hook, rules)
]
"""Every gate rule, as `add rule` commands (after a `flush table`)."""

_DROP_SHADOW = nftext.drop_table(nftext.shadow_of(GATE))


def _elements(verb: str, name: str, elements: list[str]) -> list[str]:
    return nftext.element_lines(verb, GATE, name, elements)


def render_gate(entries: Iterable[tuple[str, str]], subnets: Iterable[str]) -> Plan:
    """The whole gate, rewritten in place in one transaction (created if absent).

    The table, its sets and chains are kept; rules and set contents are
    replaced; a shadow left by an interrupted replace is dropped. If the table
    exists with other set or chain definitions, such as the IP-only
    `allowed4 { type ipv4_addr }` of earlier versions, the transaction is
    refused (changing nothing) and the plan falls back to `render_gate_replace`.
    """
    a4, a6 = split_entries(entries)
    s4, s6 = split_subnets(subnets)
    lines = [f"flush table {GATE}", *nftext.drop_table_lines(nftext.shadow_of(GATE))]
    for name, elements in (("allowed4", a4), ("allowed6", a6), ("subnets4", s4), ("subnets6", s6)):
        lines += nftext.refill(GATE, name, elements)
    in_place = _SKELETON + "\n".join([*lines, *_ADD_RULES]) + "\n"
    return Plan("gate", (in_place,), fallback=_replace(a4, a6, s4, s6))


def _replace(a4: list[str], a6: list[str], s4: list[str], s6: list[str]) -> Plan:
    body = [*_sets(a4, a6, s4, s6), *_chains(True)]
    return Plan("gate_replace", nftext.replace_txs(GATE, body, shadow_first=True))


def render_gate_replace(entries: Iterable[tuple[str, str]], subnets: Iterable[str]) -> Plan:
    """The whole gate deleted and created again, its shadow committed first (4 transactions)."""
    a4, a6 = split_entries(entries)
    s4, s6 = split_subnets(subnets)
    return _replace(a4, a6, s4, s6)


def render_gate_add(entries: Iterable[tuple[str, str]]) -> Plan | None:
    """Let these (port, ip) pairs through (idempotent); None when there are none."""
    a4, a6 = split_entries(entries)
    lines = _elements("add", "allowed4", a4) + _elements("add", "allowed6", a6)
    return one("gate_add", lines) if lines else None


def render_gate_remove(entries: Iterable[tuple[str, str]]) -> Plan | None:
    """Stop letting these (port, ip) pairs through; None when there are none.

    nftables 1.0.6 has no `destroy element`, and deleting an absent element
    fails the transaction, so each element is added then deleted in the same
    transaction: the result is "absent" whether or not it was there.
    """
    a4, a6 = split_entries(entries)
    lines: list[str] = []
    for name, elements in (("allowed4", a4), ("allowed6", a6)):
        lines += _elements("add", name, elements) + _elements("delete", name, elements)
    return one("gate_remove", lines) if lines else None


def render_gate_subnets(subnets: Iterable[str]) -> Plan:
    """Replace the guarded subnets in one transaction."""
    s4, s6 = split_subnets(subnets)
    lines = [f"flush set {GATE} subnets4", f"flush set {GATE} subnets6"]
    lines += _elements("add", "subnets4", s4) + _elements("add", "subnets6", s6)
    return one("gate_subnets", lines)


def render_gate_removal() -> Plan:
    """Remove the gate (and any shadow) whether or not it exists: nothing is gated."""
    return Plan("gate_removal", (nftext.drop_table(GATE) + _DROP_SHADOW,))
