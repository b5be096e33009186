"""The host's WireGuard key pair (X25519): the private key stays 0600 in the
agent's state directory and is never sent; the server gets the public key."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import NamedTuple

import nacl.public

from segd import files
from segd.errors import InvalidInput

KEY_FILE = "mesh.key"


class KeyPair(NamedTuple):
    private: bytes  # 32 bytes
    public: bytes  # 32 bytes

    @property
    def public_b64(self) -> str:
        """The public key as WireGuard writes it (standard base64, 44 characters)."""
        return base64.b64encode(self.public).decode()


def from_private(raw: bytes) -> KeyPair:
    if len(raw) != 32:
        raise InvalidInput(f"mesh key must be 32 bytes, not {len(raw)}")
    key = nacl.public.PrivateKey(raw)
    return KeyPair(bytes(key), bytes(key.public_key))


def decode_public(text: str) -> bytes:
    """A peer's public key from its base64 text; InvalidInput unless 32 bytes."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"invalid WireGuard public key {text[:64]!r}") from None
    if len(raw) != 32 or base64.b64encode(raw).decode() != text:
        raise InvalidInput(f"invalid WireGuard public key {text[:64]!r}")
    return raw


def load_or_create(state_dir: str | Path) -> KeyPair:
    """The key pair in `state_dir/mesh.key` (raw 32 bytes, 0600), made once."""
    path = Path(state_dir) / KEY_FILE
    raw = _read(path)
    if raw is None:
        key = nacl.public.PrivateKey.generate()
        if files.create_file(path, bytes(key), 0o600):
            return from_private(bytes(key))
        raw = _read(path)  # made by someone else meanwhile
        if raw is None:
            raise InvalidInput(f"{path}: mesh key vanished while it was created")
    return from_private(raw)


def _read(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InvalidInput(f"{path}: cannot read the mesh key: {e.strerror}") from None
    if len(data) != 32:
        raise InvalidInput(f"{path}: mesh key file is corrupt ({len(data)} bytes, want 32)")
    return data
