"""Plans and tables: the values renderers hand to the kernel module."""

from __future__ import annotations

import pytest

from segd.firewall.plan import Plan, Table, one


def test_a_plan_of_one_transaction() -> None:
    plan = one("x", ["flush set inet segd s", "add element inet segd s { 10.0.0.1 }"])
    assert plan == Plan("x", ("flush set inet segd s\nadd element inet segd s { 10.0.0.1 }\n",))
    assert plan.fallback is None


def test_text_is_every_transaction_in_order() -> None:
    assert Plan("x", ("a\n", "b\n", "a\n")).text == "a\nb\na\n"


@pytest.mark.parametrize(
    "txs", [(), ("flush ruleset",), ("a\n", "")], ids=["none", "unended", "empty"]
)
def test_a_plan_needs_whole_scripts(txs: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="plan 'x'"):
        Plan("x", txs)


def test_tables_list_and_print_as_nft_spells_them() -> None:
    t = Table("bridge", "segd_gate").check()
    assert str(t) == "bridge segd_gate"
    assert t.list_command == "list table bridge segd_gate"


@pytest.mark.parametrize(
    ("family", "name"),
    [
        ("inet", "segd; flush ruleset"),
        ("inet", ""),
        ("inet", "Segd"),
        ("nope", "segd"),
        ("inet ", "x"),
    ],
)
def test_tables_that_could_smuggle_commands_are_refused(family: str, name: str) -> None:
    with pytest.raises(ValueError, match="invalid table"):
        Table(family, name).check()
