"""The agent's state dir: its key pair, identity, and last signed instructions.

Everything is written atomically (temp file + rename), secrets 0600. The last
instructions are kept exactly as the server signed them and verified again on
load, so a restarted agent enforces what it last knew before the server answers.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import nacl.signing

from segd import crypto, files
from segd.errors import InvalidInput
from segd.wire import Instructions, SignedInstructions


class Identity(msgspec.Struct, frozen=True):
    host_id: str
    server: str
    server_keys: dict[str, str]  # key id -> base64url verify key


class InvalidInstructions(Exception):
    """Signed instructions that do not verify, or do not decode."""


_INSTR = msgspec.json.Decoder(Instructions)
_SIGNED = msgspec.json.Decoder(SignedInstructions)
_IDENT = msgspec.json.Decoder(Identity)


def verify_instructions(
    signed: SignedInstructions, server_keys: dict[str, str], host_id: str
) -> Instructions:
    """Check the server's signature and the host, then decode."""
    b64key = server_keys.get(signed.key_id)
    if b64key is None:
        raise InvalidInstructions(f"unknown server key id {signed.key_id!r}")
    try:
        key = crypto.verify_key_from_b64(b64key)
        payload = crypto.b64d(signed.payload)
        sig = crypto.b64d(signed.signature)
    except InvalidInput as e:
        raise InvalidInstructions(e.message) from None
    if not crypto.verify(key, payload, sig):
        raise InvalidInstructions("bad signature on instructions")
    try:
        instr = _INSTR.decode(payload)
    except msgspec.DecodeError as e:
        raise InvalidInstructions(f"undecodable instructions: {e}") from None
    if instr.host_id != host_id:
        raise InvalidInstructions(f"instructions are for host {instr.host_id!r}, not {host_id!r}")
    return instr


class StateDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    def signing_key(self) -> nacl.signing.SigningKey:
        return crypto.load_or_create_signing_key(self.path / "agent.key")

    def identity(self) -> Identity | None:
        p = self.path / "identity.json"
        if not p.exists():
            return None
        try:
            return _IDENT.decode(p.read_bytes())
        except msgspec.DecodeError as e:
            raise InvalidInput(f"{p}: corrupt agent identity: {e}") from None

    def save_identity(self, ident: Identity) -> None:
        files.write_atomic(self.path / "identity.json", msgspec.json.encode(ident))

    def load_instructions(self, ident: Identity) -> tuple[SignedInstructions, Instructions] | None:
        """The last verified instructions, or None (absent or failing verification)."""
        p = self.path / "instructions.json"
        if not p.exists():
            return None
        try:
            signed = _SIGNED.decode(p.read_bytes())
        except msgspec.DecodeError:
            return None
        try:
            return signed, verify_instructions(signed, ident.server_keys, ident.host_id)
        except InvalidInstructions:
            return None

    def save_instructions(self, signed: SignedInstructions) -> None:
        files.write_atomic(self.path / "instructions.json", msgspec.json.encode(signed))
