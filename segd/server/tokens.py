"""Pairing key tokens: `segd1.<b64url(claims)>.<b64url(ed25519 signature)>`.

The claims are compact JSON naming the key id, the profile id, issue and expiry
times and the server key that signed them; the signature covers the exact claims
bytes. A token proves only that the server issued it: whether the key is still
usable (revoked, uses left) is decided against the store by key id.

Pure: no I/O. Every failure is a `TokenError` with a stable reason code.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import nacl.signing

from segd import crypto
from segd.errors import Forbidden, InvalidInput

PREFIX = "segd1"
VERSION = 1
MAX_TOKEN_LEN = 2048
SIGNATURE_LEN = 64

# Reason codes (also the `error` code of a refused pairing and the audit reason).
MALFORMED = "malformed_key"
UNSUPPORTED = "unsupported_key_version"
UNKNOWN_SIGNER = "unknown_signer"
BAD_SIGNATURE = "bad_signature"
EXPIRED = "key_expired"


class Claims(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    v: int
    kid: str  # pairing key id
    pid: str  # profile id
    sk: str  # id of the server key that signed the token
    iat: int  # issued at, unix seconds
    exp: int  # expires at, unix seconds


_encode = msgspec.json.Encoder(order="deterministic").encode
_decode_claims = msgspec.json.Decoder(Claims).decode


class TokenError(Forbidden):
    """A pairing key that must be refused; `reason` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, code=reason)
        self.reason = reason


def issue(key: nacl.signing.SigningKey, claims: Claims) -> str:
    """Sign `claims` and return the token text."""
    data = _encode(claims)
    sig = key.sign(data).signature
    return f"{PREFIX}.{crypto.b64e(data)}.{crypto.b64e(sig)}"


def parse(token: str) -> tuple[Claims, bytes, bytes]:
    """Split and decode a token without checking the signature.

    Returns (claims, the exact signed bytes, the signature).
    """
    if not isinstance(token, str) or not token:
        raise TokenError(MALFORMED, "pairing key is empty")
    if len(token) > MAX_TOKEN_LEN:
        raise TokenError(MALFORMED, f"pairing key is longer than {MAX_TOKEN_LEN} characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError(MALFORMED, "pairing key must have three dot-separated parts")
    prefix, claims_b64, sig_b64 = parts
    if prefix != PREFIX:
        raise TokenError(MALFORMED, f"pairing key must start with {PREFIX!r}")
    try:
        data = crypto.b64d(claims_b64)
        sig = crypto.b64d(sig_b64)
    except InvalidInput:
        raise TokenError(MALFORMED, "pairing key is not valid base64url") from None
    if len(sig) != SIGNATURE_LEN:
        raise TokenError(MALFORMED, "pairing key signature has the wrong length")
    try:
        claims = _decode_claims(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        # msgspec raises UnicodeDecodeError, not DecodeError, for a string that is not UTF-8.
        # The claims are not signed yet: echo no more of them than a short, printable line.
        raise TokenError(
            MALFORMED, f"pairing key claims are invalid: {_printable(str(e))}"
        ) from None
    if claims.v != VERSION:
        raise TokenError(UNSUPPORTED, f"pairing key version {claims.v} is not supported")
    if claims.exp < claims.iat:
        raise TokenError(MALFORMED, "pairing key expires before it was issued")
    return claims, data, sig


def _printable(text: str, limit: int = 120) -> str:
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def verify_signature(token: str, server_keys: Mapping[str, nacl.signing.VerifyKey]) -> Claims:
    """Parse and check the signature under the named server key (not the expiry:
    an expired key still proves which key a container was given)."""
    claims, data, sig = parse(token)
    vk = server_keys.get(claims.sk)
    if vk is None:
        raise TokenError(UNKNOWN_SIGNER, "pairing key was signed by an unknown server key")
    if not crypto.verify(vk, data, sig):
        raise TokenError(BAD_SIGNATURE, "pairing key signature does not verify")
    return claims


def check_expiry(claims: Claims, now: float) -> Claims:
    if now >= claims.exp:
        raise TokenError(EXPIRED, "pairing key has expired")
    return claims


def verify(token: str, server_keys: Mapping[str, nacl.signing.VerifyKey], now: float) -> Claims:
    """Parse, check the signature under the named server key, and the expiry."""
    return check_expiry(verify_signature(token, server_keys), now)
