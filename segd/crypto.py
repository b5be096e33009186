"""Ed25519 keys, base64url, and the agent request-signing scheme.

Agent requests are signed over a canonical string of method, path (with query),
timestamp, nonce and the SHA-256 of the body. Instructions are signed as raw
JSON bytes. Key files are written through `segd.files` (0600, durable, never
through a link) and never logged.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path

import nacl.exceptions
import nacl.signing

from segd import files
from segd.errors import InvalidInput

HDR_AGENT = "X-Segd-Host"
HDR_TS = "X-Segd-Timestamp"
HDR_NONCE = "X-Segd-Nonce"
HDR_SIG = "X-Segd-Signature"


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    """Strict base64url decode (no padding needed); InvalidInput on junk."""
    if not isinstance(text, str) or len(text) > 1_000_000:
        raise InvalidInput("invalid base64url")
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidInput("invalid base64url") from None
    if b"=" in raw or any(c in raw for c in b"+/\n\r \t"):
        raise InvalidInput("invalid base64url")
    try:
        out = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except ValueError:
        raise InvalidInput("invalid base64url") from None
    if b64e(out) != text:
        raise InvalidInput("invalid base64url (non-canonical)")
    return out


def key_id_of(verify_key: nacl.signing.VerifyKey) -> str:
    return hashlib.sha256(bytes(verify_key)).hexdigest()[:16]


def load_or_create_signing_key(path: Path) -> nacl.signing.SigningKey:
    """Load a raw 32-byte seed from `path`, or create it 0600: once, durably, and
    never over an existing file (two processes starting at once load one key)."""
    seed = _read_seed(path)
    if seed is None:
        key = nacl.signing.SigningKey.generate()
        if files.create_file(path, bytes(key)):
            return key
        seed = _read_seed(path)  # made by someone else meanwhile
        if seed is None:
            raise InvalidInput(f"{path}: signing key file vanished while it was created")
    return nacl.signing.SigningKey(seed)


def _read_seed(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read the signing key: {e.strerror}") from None
    try:
        seed = os.read(fd, 33)
    finally:
        os.close(fd)
    if len(seed) != 32:
        raise InvalidInput(f"{path}: signing key file is corrupt ({len(seed)} bytes, want 32)")
    return seed


def verify_key_from_b64(text: str) -> nacl.signing.VerifyKey:
    raw = b64d(text)
    if len(raw) != 32:
        raise InvalidInput("public key must be 32 bytes of Ed25519")
    return nacl.signing.VerifyKey(raw)


def verify(key: nacl.signing.VerifyKey, message: bytes, signature: bytes) -> bool:
    try:
        key.verify(message, signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        return False
    return True


def new_nonce() -> str:
    return secrets.token_urlsafe(18)


def request_string(method: str, path_qs: str, ts: str, nonce: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join(["segd-req-v1", method.upper(), path_qs, ts, nonce, digest]).encode()


def sign_request(
    key: nacl.signing.SigningKey,
    host_id: str,
    method: str,
    path_qs: str,
    body: bytes,
    now: float,
) -> dict[str, str]:
    """Headers for a signed agent request."""
    ts = f"{now:.3f}"
    nonce = new_nonce()
    sig = key.sign(request_string(method, path_qs, ts, nonce, body)).signature
    return {HDR_AGENT: host_id, HDR_TS: ts, HDR_NONCE: nonce, HDR_SIG: b64e(sig)}
