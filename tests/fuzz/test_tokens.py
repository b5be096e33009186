"""Pairing key tokens under fuzz: `tokens.parse`/`verify` on random input and on
every kind of damage to a valid token, and the same through the pair endpoint.

Invariant: a `TokenError` with a known reason, or success; never another
exception; and success only for the exact original token.
"""

from __future__ import annotations

import base64
import json

import nacl.signing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from segd import crypto
from segd.server import tokens
from segd.server.tokens import Claims, TokenError
from tests.fuzz import strategies as fz
from tests.fuzz.harness import PAIR_CODES, Env, Request, encode, exchange
from tests.fuzz.test_server_api import PAIR

SEED = nacl.signing.SigningKey(b"\x11" * 32)
OTHER = nacl.signing.SigningKey(b"\x12" * 32)
SK = crypto.key_id_of(SEED.verify_key)
KEYS = {SK: SEED.verify_key}
NOW = 1_800_000_000
CLAIMS = Claims(v=1, kid="k_00112233445566aa", pid="p_001122334455", sk=SK, iat=NOW, exp=NOW + 600)
GOOD = tokens.issue(SEED, CLAIMS)
REASONS = {
    tokens.MALFORMED,
    tokens.UNSUPPORTED,
    tokens.UNKNOWN_SIGNER,
    tokens.BAD_SIGNATURE,
    tokens.EXPIRED,
}


def outcome(token: object, now: float = NOW) -> Claims | str:
    """The claims, or the reason of the TokenError; anything else escapes and fails."""
    try:
        return tokens.verify(token, KEYS, now)  # type: ignore[arg-type]
    except TokenError as e:
        assert e.reason in REASONS and e.code == e.reason and e.status == 403
        assert e.message and e.message.isprintable(), e.message
        return e.reason


def check(token: object) -> None:
    got = outcome(token)
    if isinstance(got, Claims):
        assert token == GOOD, f"a token other than the original verified: {token!r}"
    if isinstance(token, str):
        try:
            tokens.parse(token)
        except TokenError as e:
            assert e.reason in REASONS


# ---- damage to a valid token ---------------------------------------------------------

_PREFIX, _CLAIMS_B64, _SIG_B64 = GOOD.split(".")
_CLAIMS_BYTES = crypto.b64d(_CLAIMS_B64)
_SIG = crypto.b64d(_SIG_B64)


def _with(claims: bytes | None = None, sig: bytes | None = None, prefix: str = _PREFIX) -> str:
    c = _CLAIMS_BYTES if claims is None else claims
    s = _SIG if sig is None else sig
    return f"{prefix}.{crypto.b64e(c)}.{crypto.b64e(s)}"


def _flip(data: bytes, i: int, bit: int) -> bytes:
    i %= len(data)
    return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]


def _claims_json(**changes: object) -> bytes:
    base = json.loads(_CLAIMS_BYTES)
    base.update(changes)
    return json.dumps(base).encode()


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@st.composite
def damaged(draw: st.DrawFn) -> str:
    kind = draw(
        st.sampled_from(
            [
                "text_char",
                "claims_bit",
                "sig_bit",
                "truncate",
                "extend",
                "extra_dots",
                "padding",
                "non_canonical",
                "swap",
                "oversized",
                "case",
                "resign_changed_claims",
                "other_key",
                "std_alphabet",
                "whitespace",
                "claims_json",
                "unicode",
            ]
        )
    )
    i = draw(st.integers(0, 10_000))
    if kind == "text_char":
        i %= len(GOOD)
        c = draw(st.sampled_from(_ALPHABET + ".=+/ \x00é"))
        return GOOD[:i] + c + GOOD[i + 1 :]
    if kind == "claims_bit":
        return _with(claims=_flip(_CLAIMS_BYTES, i, draw(st.integers(0, 7))))
    if kind == "sig_bit":
        return _with(sig=_flip(_SIG, i, draw(st.integers(0, 7))))
    if kind == "truncate":
        return GOOD[: i % len(GOOD)]
    if kind == "extend":
        return GOOD + draw(st.text(_ALPHABET + ".=", min_size=1, max_size=8))
    if kind == "extra_dots":
        parts = GOOD.split(".")
        j = draw(st.integers(0, 3))
        return ".".join(parts[:j] + [""] * draw(st.integers(1, 2)) + parts[j:])
    if kind == "padding":
        parts = GOOD.split(".")
        j = draw(st.integers(1, 2))
        parts[j] += "=" * draw(st.integers(1, 3))
        return ".".join(parts)
    if kind == "non_canonical":
        # Same bytes, different text: the unused low bits of the last character set.
        parts = GOOD.split(".")
        j = draw(st.integers(1, 2))
        last = _ALPHABET.index(parts[j][-1])
        parts[j] = parts[j][:-1] + _ALPHABET[last ^ draw(st.integers(1, 3))]
        return ".".join(parts)
    if kind == "swap":
        p = GOOD.split(".")
        order = draw(st.permutations([0, 1, 2]))
        return ".".join(p[k] for k in order)
    if kind == "oversized":
        return _with(claims=_claims_json(kid="k_" + "0" * draw(st.sampled_from([100, 1600, 5000]))))
    if kind == "case":
        return GOOD.swapcase() if draw(st.booleans()) else GOOD.upper()
    if kind == "resign_changed_claims":
        data = _claims_json(
            **{draw(st.sampled_from(["kid", "pid", "exp", "iat", "v"])): draw(fz.json_values)}
        )
        return f"{_PREFIX}.{crypto.b64e(data)}.{crypto.b64e(OTHER.sign(data).signature)}"
    if kind == "other_key":
        return tokens.issue(OTHER, CLAIMS)
    if kind == "std_alphabet":
        raw = base64.b64encode(_CLAIMS_BYTES).decode()
        return f"{_PREFIX}.{raw}.{_SIG_B64}"
    if kind == "whitespace":
        i %= len(GOOD)
        return GOOD[:i] + draw(st.sampled_from([" ", "\n", "\t", "\r\n"])) + GOOD[i:]
    if kind == "claims_json":
        data = (
            draw(fz.json_values).__repr__().encode()
            if draw(st.booleans())
            else _claims_json(**{draw(st.text(max_size=5)): draw(fz.json_values)})
        )
        return _with(claims=data)
    # unicode: a lookalike or non-ASCII character somewhere
    i %= len(GOOD)
    return (
        GOOD[:i]
        + draw(st.sampled_from(["\u0455", "\uff45", "\u200b", "\ud800", "\U0001f525"]))
        + GOOD[i:]
    )


# ---- properties ----------------------------------------------------------------------


def test_the_original_verifies() -> None:
    assert outcome(GOOD) == CLAIMS


@fz.fast(800)
@given(token=st.one_of(st.text(), st.text(_ALPHABET + ".=", max_size=400), st.binary().map(repr)))
def test_random_text_is_refused_cleanly(token: str) -> None:
    check(token)
    assert outcome(token) != CLAIMS


@fz.fast(1000)
@given(token=damaged())
def test_every_damage_to_a_valid_token_is_refused_cleanly(token: str) -> None:
    check(token)


@fz.fast(100)
@given(value=fz.json_values)
def test_non_string_input_is_refused_cleanly(value: object) -> None:
    assert outcome(value) == tokens.MALFORMED


@fz.fast(150)
@given(claims=fz.json_values)
def test_any_signed_claims_verify_or_are_refused_cleanly(claims: object) -> None:
    """Even claims the server's own key signed: anything but Claims is malformed."""
    data = json.dumps(claims).encode()
    token = f"{_PREFIX}.{crypto.b64e(data)}.{crypto.b64e(SEED.sign(data).signature)}"
    got = outcome(token)
    assert isinstance(got, Claims) or got in REASONS


@pytest.mark.slow
@fz.slow(100_000)
@given(token=damaged())
def test_every_damage_to_a_valid_token_is_refused_cleanly_long(token: str) -> None:
    check(token)


# ---- through the pair endpoint -------------------------------------------------------


def _damaged_server_token(token: str) -> st.SearchStrategy[str]:
    p, c, s = token.split(".")
    claims = crypto.b64d(c)
    sig = crypto.b64d(s)
    return st.one_of(
        st.integers(0, len(token) - 1).map(lambda i: token[:i]),
        st.tuples(st.integers(0, len(claims) - 1), st.integers(0, 7)).map(
            lambda t: f"{p}.{crypto.b64e(_flip(claims, *t))}.{s}"
        ),
        st.tuples(st.integers(0, len(sig) - 1), st.integers(0, 7)).map(
            lambda t: f"{p}.{c}.{crypto.b64e(_flip(sig, *t))}"
        ),
        st.sampled_from([token + ".", f"{p}.{s}.{c}", f"{p}.{c}=.{s}", token.upper(), token * 2]),
    )


@fz.fast(60)
@given(data=st.data())
async def test_damaged_keys_through_the_pair_endpoint(env: Env, data: st.DataObject) -> None:
    """Refused with a token reason, audited, no use consumed (harness.exchange)."""
    original = env.tokens[data.draw(st.sampled_from(["db", "web"]))]
    token = data.draw(_damaged_server_token(original), label="token")
    body = {"container_id": "c-tok", "pairing_key": token, "ips": ["10.9.200.1"]}
    status, raw = await exchange(
        env, Request(PAIR, "POST", PAIR.path, encode(body), "agent", signer=env.a)
    )
    if token != original:
        assert status in (400, 403), (status, raw)
        if status == 403:
            assert json.loads(raw)["error"] in PAIR_CODES
