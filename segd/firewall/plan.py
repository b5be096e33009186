"""Kernel plans: what the renderers return and `segd.firewall.kernel` runs (pure).

A `Plan` is the nftables work for one network namespace: scripts run in
order, each committed as one transaction. If a transaction is refused, the
ones before it stay committed and the rest do not run; when the *first* one
is refused nothing has changed, and `fallback`, if any, runs instead (the
kernel module logs `firewall.fallback`). A renderer uses that for "rewrite in
place, or replace whole if the table is not of our shape".

Plans are values: the same input renders the same plan, and a test can compare
one with the text it expects, or feed its transactions to anything that reads
nft scripts.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import msgspec

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}\Z")
_FAMILIES = frozenset({"inet", "ip", "ip6", "bridge", "arp", "netdev"})


class Table(NamedTuple):
    """An nftables table: family and name."""

    family: str
    name: str

    def __str__(self) -> str:
        return f"{self.family} {self.name}"

    @property
    def list_command(self) -> str:
        """The command that lists the table (stateless output is the kernel module's)."""
        return f"list table {self}"

    def check(self) -> Table:
        """This table, if its family and name may reach an nft command; else ValueError."""
        if self.family not in _FAMILIES or not _NAME_RE.match(self.name):
            raise ValueError(f"invalid table {self.family!r} {self.name!r}")
        return self


class Plan(msgspec.Struct, frozen=True):
    """nft scripts to run in one namespace, each one transaction, in order.

    `what` names the plan in logs ("workload", "gate_add", ...). `fallback`
    runs in place of this plan when its first transaction is refused.
    `counts`: connections in this namespace are counted by conntrack (packets
    and bytes of each, read by the kernel module).
    """

    what: str
    txs: tuple[str, ...]
    fallback: Plan | None = None
    counts: bool = False

    def __post_init__(self) -> None:
        if not self.txs or any(not tx.endswith("\n") for tx in self.txs):
            raise ValueError(f"plan {self.what!r}: want scripts that each end in a newline")

    @property
    def text(self) -> str:
        """All transactions, one after the other (for reading and for tests)."""
        return "".join(self.txs)


def one(what: str, lines: list[str], fallback: Plan | None = None) -> Plan:
    """A plan of one transaction made of `lines`."""
    return Plan(what, ("\n".join(lines) + "\n",), fallback)
