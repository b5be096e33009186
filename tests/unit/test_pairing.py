"""The pairing decision as tables: key state, then label locking in both modes."""

from __future__ import annotations

import msgspec
import pytest

from segd import wire
from segd.policy import DEFAULT_DIMENSIONS
from segd.server import pairing
from segd.server.pairing import Denied
from segd.server.tokens import EXPIRED, Claims

NOW = 1_800_000_000.0
PROFILE = wire.Profile(
    id="p_000000000001",
    name="db",
    labels={"app": "shop", "env": "prod", "role": "db"},
    locked=["app", "role"],
    max_uses=3,
    lifespan_s=3600,
    on_mismatch="deny",
    enabled=True,
    description="",
    created_at=NOW - 10,
)
KEY = wire.PairingKey(
    key_id="k_0000000000000001",
    profile="db",
    max_uses=3,
    uses=0,
    issued_at=NOW - 10,
    expires_at=NOW + 600,
    revoked=False,
    description="",
)
CLAIMS = Claims(v=1, kid=KEY.key_id, pid=PROFILE.id, sk="s", iat=int(NOW) - 10, exp=int(NOW) + 600)


def key(**changes: object) -> wire.PairingKey:
    return msgspec.structs.replace(KEY, **changes)


def profile(**changes: object) -> wire.Profile:
    return msgspec.structs.replace(PROFILE, **changes)


# (name, key row, profile row, claims, now, reason or None)
# fmt: off
KEY_CASES: list[tuple[str, wire.PairingKey | None, wire.Profile | None, Claims, float,
                      str | None]] = [
    ("live", KEY, PROFILE, CLAIMS, NOW, None),
    ("last use left", key(uses=2), PROFILE, CLAIMS, NOW, None),
    ("unknown key id", None, None, CLAIMS, NOW, pairing.UNKNOWN_KEY),
    ("row of another key", key(key_id="k_0000000000000002"), PROFILE, CLAIMS, NOW,
     pairing.UNKNOWN_KEY),
    ("claims another profile", KEY, profile(id="p_000000000002"), CLAIMS, NOW,
     pairing.KEY_PROFILE_MISMATCH),
    ("revoked", key(revoked=True), PROFILE, CLAIMS, NOW, pairing.REVOKED),
    ("expired by the store", key(expires_at=NOW - 1), PROFILE, CLAIMS, NOW, EXPIRED),
    ("expires exactly now", KEY, PROFILE, CLAIMS, NOW + 600, EXPIRED),
    ("exhausted", key(uses=3), PROFILE, CLAIMS, NOW, pairing.EXHAUSTED),
    ("profile disabled", KEY, profile(enabled=False), CLAIMS, NOW, pairing.PROFILE_DISABLED),
    ("revoked beats exhausted", key(revoked=True, uses=3), PROFILE, CLAIMS, NOW,
     pairing.REVOKED),
]
# fmt: on


@pytest.mark.parametrize(
    ("name", "k", "p", "claims", "now", "reason"), KEY_CASES, ids=[c[0] for c in KEY_CASES]
)
def test_key_checks(
    name: str,
    k: wire.PairingKey | None,
    p: wire.Profile | None,
    claims: Claims,
    now: float,
    reason: str | None,
) -> None:
    if reason is None:
        pairing.check_key(claims, k, p, now)
        return
    with pytest.raises(Denied) as e:
        pairing.check_key(claims, k, p, now)
    assert e.value.reason == reason and e.value.status == 403 and e.value.message


# A container the key admitted before: expiry and uses are not held against it.
# (name, key row, profile row, reason or None)
# fmt: off
READMIT_CASES: list[tuple[str, wire.PairingKey | None, wire.Profile | None, str | None]] = [
    ("live", KEY, PROFILE, None),
    ("expired", key(expires_at=NOW - 1), PROFILE, None),
    ("exhausted", key(uses=3), PROFILE, None),
    ("expired and exhausted", key(uses=3, expires_at=NOW - 1), PROFILE, None),
    ("unlimited", key(max_uses=None, uses=10**6), PROFILE, None),
    ("revoked", key(revoked=True, expires_at=NOW - 1), PROFILE, pairing.REVOKED),
    ("key deleted", None, None, pairing.UNKNOWN_KEY),
    ("profile disabled", key(uses=3), profile(enabled=False), pairing.PROFILE_DISABLED),
]
# fmt: on


@pytest.mark.parametrize(("name", "k", "p", "reason"), READMIT_CASES,
                         ids=[c[0] for c in READMIT_CASES])  # fmt: skip
def test_readmission_checks(
    name: str, k: wire.PairingKey | None, p: wire.Profile | None, reason: str | None
) -> None:
    if reason is None:
        pairing.check_key(CLAIMS, k, p, NOW, readmit=True)
        return
    with pytest.raises(Denied) as e:
        pairing.check_key(CLAIMS, k, p, NOW, readmit=True)
    assert e.value.reason == reason


def test_unlimited_key_is_never_exhausted() -> None:
    pairing.check_key(CLAIMS, key(max_uses=None, uses=10**9), PROFILE, NOW)


# (name, on_mismatch, requested, expected labels | denial reason)
# fmt: off
LABEL_CASES: list[tuple[str, str, dict[str, str], dict[str, str] | str]] = [
    ("nothing requested", "deny", {},
     {"app": "shop", "env": "prod", "role": "db"}),
    ("locked values repeated", "deny", {"role": "db", "app": "shop"},
     {"app": "shop", "env": "prod", "role": "db"}),
    ("unlocked value overridden", "deny", {"env": "dev"},
     {"app": "shop", "env": "dev", "role": "db"}),
    ("new unlocked dimension", "deny", {"loc": "eu"},
     {"app": "shop", "env": "prod", "loc": "eu", "role": "db"}),
    ("locked contradicted", "deny", {"role": "web"}, pairing.LABEL_MISMATCH),
    ("locked contradicted among fine ones", "deny", {"env": "dev", "app": "blog"},
     pairing.LABEL_MISMATCH),
    ("invalid value", "deny", {"env": "pr od"}, pairing.INVALID_LABELS),
    ("unknown dimension", "deny", {"colour": "red"}, pairing.INVALID_LABELS),
    # on_mismatch=default: a contradiction gets exactly the profile's labels
    ("default: nothing requested", "default", {},
     {"app": "shop", "env": "prod", "role": "db"}),
    ("default: unlocked value overridden", "default", {"env": "dev"},
     {"app": "shop", "env": "dev", "role": "db"}),
    ("default: locked contradicted", "default", {"role": "web", "env": "dev", "loc": "eu"},
     {"app": "shop", "env": "prod", "role": "db"}),
    ("default: invalid value still refused", "default", {"role": "w b"},
     pairing.INVALID_LABELS),
]
# fmt: on


@pytest.mark.parametrize(
    ("name", "mode", "requested", "expected"), LABEL_CASES, ids=[c[0] for c in LABEL_CASES]
)
def test_label_locking(
    name: str, mode: str, requested: dict[str, str], expected: dict[str, str] | str
) -> None:
    p = profile(on_mismatch=mode)
    if isinstance(expected, str):
        with pytest.raises(Denied) as e:
            pairing.decide_labels(p, requested, DEFAULT_DIMENSIONS)
        assert e.value.reason == expected
        return
    d = pairing.decide_labels(p, requested, DEFAULT_DIMENSIONS)
    assert d.labels == expected
    assert list(d.labels) == sorted(d.labels)
    assert d.defaulted == (mode == "default" and name.endswith("contradicted"))


def test_mismatch_message_names_the_dimension() -> None:
    with pytest.raises(Denied) as e:
        pairing.decide_labels(PROFILE, {"role": "web"}, DEFAULT_DIMENSIONS)
    assert "role=web" in e.value.message and "role=db" in e.value.message


def test_decide_checks_the_key_first() -> None:
    with pytest.raises(Denied) as e:
        pairing.decide(CLAIMS, key(revoked=True), PROFILE, {"role": "web"}, DEFAULT_DIMENSIONS, NOW)
    assert e.value.reason == pairing.REVOKED
    d = pairing.decide(CLAIMS, KEY, PROFILE, {"env": "dev"}, DEFAULT_DIMENSIONS, NOW)
    assert d.labels["env"] == "dev" and not d.defaulted
