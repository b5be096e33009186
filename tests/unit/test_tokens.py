"""Pairing key tokens: what verifies and what is refused, with which reason."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import nacl.signing
import pytest

from segd import crypto
from segd.server import tokens
from segd.server.tokens import Claims, TokenError

SEED = nacl.signing.SigningKey(b"\x01" * 32)
OTHER = nacl.signing.SigningKey(b"\x02" * 32)
SK = crypto.key_id_of(SEED.verify_key)
KEYS = {SK: SEED.verify_key}
NOW = 1_800_000_000
CLAIMS = Claims(v=1, kid="k_00112233445566aa", pid="p_0011223344", sk=SK, iat=NOW, exp=NOW + 600)
GOOD = tokens.issue(SEED, CLAIMS)


def _token(claims_json: bytes, key: nacl.signing.SigningKey = SEED) -> str:
    sig = key.sign(claims_json).signature
    return f"segd1.{crypto.b64e(claims_json)}.{crypto.b64e(sig)}"


def _claims(**changes: object) -> bytes:
    base = {"v": 1, "kid": CLAIMS.kid, "pid": CLAIMS.pid, "sk": SK, "iat": NOW, "exp": NOW + 600}
    return json.dumps({**base, **changes}).encode()


def _parts(t: str) -> list[str]:
    return t.split(".")


def _swap_sig(t: str, sig: bytes) -> str:
    p = _parts(t)
    return f"{p[0]}.{p[1]}.{crypto.b64e(sig)}"


def test_good_token_verifies_and_round_trips() -> None:
    assert tokens.verify(GOOD, KEYS, NOW) == CLAIMS
    claims, data, sig = tokens.parse(GOOD)
    assert claims == CLAIMS and crypto.verify(SEED.verify_key, data, sig)
    assert len(GOOD) < 400


Case = tuple[str, Callable[[], str], float, str]

# fmt: off
CASES: list[Case] = [
    # forged / wrong key
    ("forged claims, old signature",
     lambda: f"segd1.{crypto.b64e(_claims(pid='p_9999999999'))}.{_parts(GOOD)[2]}",
     NOW, tokens.BAD_SIGNATURE),
    ("signed by another key under our key id", lambda: _token(_claims(), OTHER),
     NOW, tokens.BAD_SIGNATURE),
    ("unknown signer", lambda: _token(_claims(sk="ffffffffffffffff"), OTHER),
     NOW, tokens.UNKNOWN_SIGNER),
    ("flipped signature bit", lambda: _swap_sig(GOOD, bytes([1]) + b"\x00" * 63),
     NOW, tokens.BAD_SIGNATURE),
    # time
    ("expired", lambda: GOOD, NOW + 600, tokens.EXPIRED),
    ("long expired", lambda: GOOD, NOW + 86400, tokens.EXPIRED),
    ("expires before issued", lambda: _token(_claims(exp=NOW - 1)), NOW, tokens.MALFORMED),
    # shape
    ("empty", lambda: "", NOW, tokens.MALFORMED),
    ("truncated", lambda: GOOD[:-5], NOW, tokens.MALFORMED),
    ("truncated to two parts", lambda: ".".join(_parts(GOOD)[:2]), NOW, tokens.MALFORMED),
    ("extra part", lambda: GOOD + ".AAAA", NOW, tokens.MALFORMED),
    ("wrong prefix", lambda: "segd2" + GOOD[5:], NOW, tokens.MALFORMED),
    ("padded base64", lambda: GOOD.replace(".", "=.", 1), NOW, tokens.MALFORMED),
    ("standard base64 alphabet",
     lambda: "segd1." + base64.b64encode(_claims() + b"\xff\xfe").decode().rstrip("=") + ".x",
     NOW, tokens.MALFORMED),
    ("not base64 at all", lambda: "segd1.!!!.???", NOW, tokens.MALFORMED),
    ("whitespace inside", lambda: GOOD[:20] + " " + GOOD[20:], NOW, tokens.MALFORMED),
    ("too long", lambda: "segd1." + "A" * 3000 + ".AA", NOW, tokens.MALFORMED),
    ("short signature", lambda: _swap_sig(GOOD, b"\x00" * 63), NOW, tokens.MALFORMED),
    ("claims not JSON", lambda: _token(b"hello"), NOW, tokens.MALFORMED),
    ("claims an array", lambda: _token(b"[1,2]"), NOW, tokens.MALFORMED),
    ("claims missing kid", lambda: _token(json.dumps({"v": 1}).encode()), NOW, tokens.MALFORMED),
    ("claims unknown field", lambda: _token(_claims(admin=True)), NOW, tokens.MALFORMED),
    ("claims wrong type", lambda: _token(_claims(exp=str(NOW + 600))), NOW, tokens.MALFORMED),
    ("claims float time", lambda: _token(_claims(exp=NOW + 600.5)), NOW, tokens.MALFORMED),
    ("unsupported version", lambda: _token(_claims(v=2)), NOW, tokens.UNSUPPORTED),
]
# fmt: on


@pytest.mark.parametrize(("name", "make", "now", "reason"), CASES, ids=[c[0] for c in CASES])
def test_refused(name: str, make: Callable[[], str], now: float, reason: str) -> None:
    with pytest.raises(TokenError) as e:
        tokens.verify(make(), KEYS, now)
    assert e.value.reason == reason == e.value.code
    assert e.value.status == 403 and e.value.message


def test_non_canonical_base64_is_refused() -> None:
    """The last base64url character of a 64-byte signature carries 4 unused bits;
    setting one decodes to the same bytes, but the token text is not the one issued."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    prefix, claims, sig = _parts(GOOD)
    alt = sig[:-1] + alphabet[alphabet.index(sig[-1]) ^ 1]
    assert base64.urlsafe_b64decode(alt + "==") == base64.urlsafe_b64decode(sig + "==")
    with pytest.raises(TokenError) as e:
        tokens.parse(f"{prefix}.{claims}.{alt}")
    assert e.value.reason == tokens.MALFORMED


def test_expired_token_still_proves_its_key() -> None:
    """The signature check alone takes an expired token (a restart of a container
    its key admitted); the full check refuses it."""
    assert tokens.verify_signature(GOOD, KEYS) == CLAIMS
    with pytest.raises(tokens.TokenError) as e:
        tokens.verify(GOOD, KEYS, NOW + 600)
    assert e.value.reason == tokens.EXPIRED
    with pytest.raises(tokens.TokenError) as e:
        tokens.verify_signature(_swap_sig(GOOD, b"\x00" * 64), KEYS)
    assert e.value.reason == tokens.BAD_SIGNATURE
