"""The addresses of containers refused a pairing, as the server last saw them."""

from __future__ import annotations

from segd.server.unpaired import Refused, UnpairedSeen


def test_refused_addresses_are_kept_until_paired_or_pushed_out() -> None:
    seen = UnpairedSeen(limit=3)
    a = Refused("h1", "c1", "key_revoked")
    b = Refused("h1", "c2", "unknown_key")
    seen.refused(["10.0.0.1", "10.0.0.2"], a)
    seen.refused(["10.0.0.3"], b)
    assert seen.get("10.0.0.1") == a and seen.get("10.0.0.3") == b and len(seen) == 3
    seen.paired(["10.0.0.2"])
    assert seen.get("10.0.0.2") is None
    seen.refused(["10.0.0.1"], b)  # seen again: the newest
    seen.refused(["10.0.0.4", "10.0.0.5"], a)
    assert len(seen) == 3
    assert seen.get("10.0.0.3") is None  # the oldest went first
    assert seen.get("10.0.0.1") == b
