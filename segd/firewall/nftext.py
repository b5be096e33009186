"""nftables text shared by the container table and the host gate (pure).

Addresses and address blocks are validated here (`check_addr`, `split_addrs`,
`check_block`, `split_blocks`); set, element,
chain and table text is built here; and so is the one way segd replaces a
whole table without a gap (`replace_txs`). Callers validate their own names
before they reach these functions.

Measured on kernel 6.18 / nftables 1.0.6: deleting and re-creating a table
under the *same name* in one transaction lets packets through that table
while the transaction commits (about 1 packet in 130 of a flood, over
thousands of replaces). Other tables keep enforcing, and a table created
under a new name enforces from its commit on. So a whole-table replace of T
is three transactions: drop `T_shadow`; create `T_shadow` with the new
contents *and* replace T; drop `T_shadow`. The switch from old to new rules
still happens in one commit; until the last step a packet must pass both
copies of the new rules. That is enough for tables that only accept (policy
drop). A table that drops on a *match* in one of its sets (the host gate)
also leaks through a shadow created in the same transaction as the replace:
`shadow_first` commits the shadow in a transaction of its own first, so four
transactions: drop `T_shadow`; create it; replace T; drop it.

Rewriting a table in place (keep the table, its sets and base chains; flush
its rules, flush and refill its sets, add the rules again; one transaction)
never unhooks a chain, and lets nothing through: see `render` and `gate`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from segd.firewall.plan import Table

SHADOW_SUFFIX = "_shadow"

Addr = ipaddress.IPv4Address | ipaddress.IPv6Address


# ---- addresses -----------------------------------------------------------------------


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


def check_block(text: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """One IPv4 or IPv6 address block in CIDR form, host bits zero."""
    if not isinstance(text, str) or "/" not in text or not text.isascii() or "%" in text:
        raise ValueError(f"invalid address block {text!r}")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise ValueError(f"invalid address block {text!r}") from None


def split_blocks(texts: Iterable[str]) -> tuple[list[str], list[str]]:
    """Validate address blocks; return (ipv4, ipv6) texts, overlapping and adjacent
    blocks merged (an interval set refuses overlapping elements), sorted."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for t in texts:
        net = check_block(t)
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    return (
        [str(n) for n in ipaddress.collapse_addresses(v4)],
        [str(n) for n in ipaddress.collapse_addresses(v6)],
    )


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


# ---- pieces of a `table { ... }` block -----------------------------------------------


def set_block(name: str, typ: str, elements: Sequence[str], interval: bool = False) -> list[str]:
    """A named set definition inside a `table { ... }` block."""
    return [
        f"\tset {name} {{",
        f"\t\ttype {typ}",
        *(["\t\tflags interval"] if interval else []),
        *([f"\t\telements = {{ {', '.join(elements)} }}"] if elements else []),
        "\t}",
    ]


def chain_block(name: str, head: str, rules: Sequence[str] = ()) -> list[str]:
    """A chain inside a `table { ... }` block; `head` is its `type ... policy ...;` line."""
    return [f"\tchain {name} {{", f"\t\t{head}", *(f"\t\t{rule}" for rule in rules), "\t}"]


def table_text(table: Table, body: Sequence[str]) -> str:
    """`table FAMILY NAME { body }`: declares what is not there yet, adds to what is."""
    return "\n".join([f"table {table} {{", *body, "}"]) + "\n"


# ---- commands ------------------------------------------------------------------------


def drop_table_lines(table: Table) -> list[str]:
    """Remove `table` whether or not it exists (nftables 1.0.6 has no `destroy`)."""
    return [f"add table {table}", f"delete table {table}"]


def drop_table(table: Table) -> str:
    """`drop_table_lines` as a script."""
    return "\n".join(drop_table_lines(table)) + "\n"


def drop_set(table: Table, name: str, typ: str, interval: bool = False) -> list[str]:
    """Remove the set `name` whether or not it exists; its rules must be gone first."""
    flags = " flags interval;" if interval else ""
    return [f"add set {table} {name} {{ type {typ};{flags} }}", f"delete set {table} {name}"]


def element_lines(verb: str, table: Table, name: str, elements: Sequence[str]) -> list[str]:
    """`add`/`delete element` on the set `table name`; nothing for no elements."""
    return [f"{verb} element {table} {name} {{ {', '.join(elements)} }}"] if elements else []


def refill(table: Table, name: str, elements: Sequence[str]) -> list[str]:
    """Make the set hold exactly `elements`."""
    return [f"flush set {table} {name}", *element_lines("add", table, name, elements)]


def rule_lines(table: Table, chain: str, rules: Sequence[str]) -> list[str]:
    return [f"add rule {table} {chain} {rule}" for rule in rules]


def shadow_of(table: Table) -> Table:
    return Table(table.family, table.name + SHADOW_SUFFIX)


def replace_script(table: Table, body: Sequence[str]) -> str:
    """The whole table deleted and created again, in one transaction (not gap-free alone)."""
    return drop_table(table) + table_text(table, body)


def replace_txs(table: Table, body: Sequence[str], *, shadow_first: bool) -> tuple[str, ...]:
    """The transactions that make `table` exactly `body` with no moment of lesser enforcement.

    Works whatever the table holds now, or if it is absent; leaves no shadow.
    """
    shadow = shadow_of(table)
    drop = drop_table(shadow)
    copy = table_text(shadow, body)
    script = replace_script(table, body)
    if shadow_first:
        return (drop, copy, script, drop)
    return (drop, copy + script, drop)
