"""The pairing decision: may this key pair a workload, and with which labels?

Given verified token claims, the key's row, its profile and the labels the
container asked for, decide the workload's final labels or refuse with a reason
code. Locked dimensions always come from the profile; requested values are
taken for the others. A request that contradicts a locked dimension is refused
(`on_mismatch="deny"`) or given exactly the profile's label set
(`on_mismatch="default"`).

A container the key already admitted (`readmit`: paired with this key id
before, on this host) pairs again whatever the key's expiry and use count: they
limit how many new containers a key admits, not the restarts of those it did.
Its key is checked otherwise exactly as for a new container.

Pure: no I/O. The store repeats the use-count guard atomically when it records
the workload, so a decision made on a stale row cannot over-use a key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from segd import policy, wire
from segd.errors import Forbidden, InvalidInput
from segd.policy import Labels
from segd.server.tokens import EXPIRED, Claims

UNKNOWN_KEY = "unknown_key"
KEY_PROFILE_MISMATCH = "key_profile_mismatch"
REVOKED = "key_revoked"
EXHAUSTED = "key_exhausted"
PROFILE_DISABLED = "profile_disabled"
INVALID_LABELS = "invalid_labels"
LABEL_MISMATCH = "label_mismatch"
IP_IN_USE = "ip_in_use"
KEY_MISMATCH = "key_mismatch"  # not the key the container's workload was paired with
HELD = "unpaired_by_admin"  # an admin unpaired this container: it stays unpaired


class Denied(Forbidden):
    """A refused pairing; `reason` is a stable code (also the API error code)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, code=reason)
        self.reason = reason


class Decision(msgspec.Struct, frozen=True):
    labels: Labels
    defaulted: bool = False  # the request contradicted a lock; profile labels applied


def check_key(
    claims: Claims,
    key: wire.PairingKey | None,
    profile: wire.Profile | None,
    now: float,
    *,
    readmit: bool = False,
) -> None:
    """Refuse a key that is unknown, revoked, expired, used up, or whose profile is
    off; expiry and uses are not held against a container the key `readmit`s."""
    if key is None or profile is None or key.key_id != claims.kid:
        raise Denied(UNKNOWN_KEY, f"pairing key {claims.kid} is not known (revoked or deleted)")
    if profile.id != claims.pid:
        raise Denied(KEY_PROFILE_MISMATCH, f"pairing key {claims.kid} names another profile")
    if key.revoked:
        raise Denied(REVOKED, f"pairing key {key.key_id} has been revoked")
    if not readmit and now >= key.expires_at:
        raise Denied(EXPIRED, f"pairing key {key.key_id} has expired")
    if not readmit and key.max_uses is not None and key.uses >= key.max_uses:
        raise Denied(EXHAUSTED, f"pairing key {key.key_id} has no uses left ({key.max_uses})")
    if not profile.enabled:
        raise Denied(PROFILE_DISABLED, f"pairing profile {profile.name!r} is disabled")


def decide_labels(
    profile: wire.Profile, requested: Mapping[str, str], dimensions: Iterable[str]
) -> Decision:
    """The final label set for a workload of `profile` that asked for `requested`."""
    try:
        requested = policy.validate_labels(requested, dimensions)
    except InvalidInput as e:
        raise Denied(INVALID_LABELS, f"requested labels are invalid: {e.message}") from None
    locked = set(profile.locked)
    clashes = [
        f"{d}={requested[d]} (locked to {d}={profile.labels[d]})"
        for d in sorted(locked)
        if d in requested and requested[d] != profile.labels.get(d)
    ]
    if clashes:
        if profile.on_mismatch == "default":
            return Decision(labels=dict(profile.labels), defaulted=True)
        raise Denied(
            LABEL_MISMATCH,
            f"requested labels contradict profile {profile.name!r}: " + ", ".join(clashes),
        )
    merged = dict(profile.labels)
    merged.update({d: v for d, v in requested.items() if d not in locked})
    return Decision(labels={k: merged[k] for k in sorted(merged)})


def decide(
    claims: Claims,
    key: wire.PairingKey | None,
    profile: wire.Profile | None,
    requested: Mapping[str, str],
    dimensions: Iterable[str],
    now: float,
    *,
    readmit: bool = False,
) -> Decision:
    """Check the key against its row and profile, then decide the labels."""
    check_key(claims, key, profile, now, readmit=readmit)
    assert profile is not None
    return decide_labels(profile, requested, dimensions)
