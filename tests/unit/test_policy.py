"""Label parsing, subset matching and service parsing, as tables."""

import pytest

from segd import policy
from segd.errors import InvalidInput
from segd.policy import Service

DIMS = policy.DEFAULT_DIMENSIONS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("role=web", {"role": "web"}),
        ("role=web,app=shop", {"app": "shop", "role": "web"}),
        (" role = web , env=prod ", {"env": "prod", "role": "web"}),
        ("", {}),
        ("loc=eu-west.1", {"loc": "eu-west.1"}),
    ],
)
def test_parse_labels_ok(text: str, expected: dict[str, str]) -> None:
    got = policy.parse_labels(text, DIMS)
    assert got == expected
    assert list(got) == sorted(got)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("role", "expected dimension=value"),
        ("colour=red", "unknown label dimension 'colour'"),
        ("role=web,role=db", "given twice"),
        ("role=", "invalid value ''"),
        ("role=a b", "invalid value"),
        ("role=x'; DROP TABLE workloads;--", "invalid value"),
        ("role=$(reboot)", "invalid value"),
        ("role=a}", "invalid value"),
        ("role=" + "a" * 64, "invalid value"),
        ("role=-web", "invalid value"),
    ],
)
def test_parse_labels_refused(text: str, needle: str) -> None:
    with pytest.raises(InvalidInput) as e:
        policy.parse_labels(text, DIMS)
    assert needle in e.value.message


@pytest.mark.parametrize(
    ("workload", "selector", "expected"),
    [
        ({"role": "web", "app": "shop"}, {"role": "web"}, True),
        ({"role": "web", "app": "shop"}, {"role": "web", "app": "shop"}, True),
        ({"role": "web"}, {"role": "web", "app": "shop"}, False),
        ({"role": "web", "app": "shop"}, {"role": "db"}, False),
        ({"role": "web"}, {}, True),
        ({}, {}, True),
        ({}, {"role": "web"}, False),
        ({"role": "web", "env": "prod"}, {"env": "dev"}, False),
    ],
)
def test_subset_match(workload: dict[str, str], selector: dict[str, str], expected: bool) -> None:
    assert policy.matches(workload, selector) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp/5432", Service("tcp", 5432, 5432)),
        ("udp/53", Service("udp", 53, 53)),
        ("tcp/8000-8100", Service("tcp", 8000, 8100)),
        ("ICMP", Service("icmp")),
        ("tcp/1-65535", Service("tcp", 1, 65535)),
    ],
)
def test_parse_service_ok(text: str, expected: Service) -> None:
    assert policy.parse_service(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "tcp",
        "tcp/",
        "tcp/0",
        "tcp/65536",
        "tcp/10-5",
        "sctp/1",
        "tcp/abc",
        "tcp/1-2-3",
        "icmp/1",
        "",
    ],
)
def test_parse_service_refused(text: str) -> None:
    with pytest.raises(InvalidInput):
        policy.parse_service(text)


def test_service_str_round_trip() -> None:
    for text in ["tcp/5432", "udp/53", "tcp/8000-8100", "icmp"]:
        assert str(policy.parse_service(text)) == text


def test_selectors_any_alone() -> None:
    assert policy.parse_selectors(["any"], DIMS) == "any"
    with pytest.raises(InvalidInput):
        policy.parse_selectors(["any", "role=web"], DIMS)
    with pytest.raises(InvalidInput):
        policy.parse_selectors([], DIMS)


def test_set_name_stable_and_safe() -> None:
    a = policy.set_name({"role": "web", "app": "shop"})
    b = policy.set_name({"app": "shop", "role": "web"})
    assert a == b
    assert a.startswith("ls_") and len(a) == 19
    assert policy.set_name({"role": "db"}) != a


@pytest.mark.parametrize(
    "dims", [[], ["Role"], ["role", "role"], ["a" * 33], [f"d{i}" for i in range(17)]]
)
def test_dimensions_refused(dims: list[str]) -> None:
    with pytest.raises(InvalidInput):
        policy.validate_dimensions(dims)
