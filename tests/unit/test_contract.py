"""The container-label contract: what the orchestrator writes, the agent reads."""

from __future__ import annotations

import pytest

from segd import contract


def test_key_labels_round_trip() -> None:
    labels = contract.key_labels("segd1.abc.def", {"role": "web", "app": "shop"})
    assert labels == {
        "segd.pairing-key": "segd1.abc.def",
        "segd.label.role": "web",
        "segd.label.app": "shop",
    }
    assert contract.pairing_key(labels) == "segd1.abc.def"
    assert contract.requested_labels(labels) == {"app": "shop", "role": "web"}


@pytest.mark.parametrize(
    ("labels", "key", "requested"),
    [
        ({}, "", {}),
        ({"segd.pairing-key": "  tok \n"}, "tok", {}),
        ({"segd.label.role": "db", "other": "x", "segd.labelrole": "y"}, "", {"role": "db"}),
        ({"segd.label.": "empty-dimension"}, "", {"": "empty-dimension"}),
    ],
)
def test_reading_labels(labels: dict[str, str], key: str, requested: dict[str, str]) -> None:
    assert contract.pairing_key(labels) == key
    assert contract.requested_labels(labels) == requested


@pytest.mark.parametrize(
    ("label", "reserved"),
    [
        ("segd.pairing-key", True),
        ("segd.label.role", True),
        ("segd.orch.managed", True),
        ("segd.demo", False),
        ("com.example.team", False),
    ],
)
def test_reserved(label: str, reserved: bool) -> None:
    assert contract.is_reserved(label) is reserved
