"""The admin token: exactly one valid at a time, the one in `<data_dir>/admin.token`.

The store keeps only its SHA-256. At start (`ensure`) the token in the file
stays valid and any other is dropped; when the file is missing or holds no
valid token, a new one is written there (0600, atomically) and every other is
invalidated, logged and audited, so deleting the file and restarting rotates
the token and never leaves a second one valid. A file that cannot be read
stops the start. `rotate` replaces the token on request, in one transaction.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from segd import files, log, wire
from segd.config import ADMIN_TOKEN_FILE
from segd.server.store import Store

_log = log.get("segd.server")


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _new_token() -> str:
    return "segd_" + secrets.token_urlsafe(32)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


async def ensure(store: Store, data_dir: Path, now: float) -> str:
    """Make the file hold the one valid token; return its hash."""
    path = data_dir / ADMIN_TOKEN_FILE
    hashes = await store.admin_token_hashes()
    current = _read(path)
    if current and sha256_hex(current) in hashes:
        h = sha256_hex(current)
        if len(hashes) > 1:
            async with store.write() as tx:
                dropped = tx.keep_only_admin_token(h, now)
                tx.audit(now, "admin.tokens_invalidated", "ok", detail=f"{dropped} tokens")
            _log.warning("admin.tokens_invalidated", count=dropped, kept=str(path))
        return h
    token = _new_token()
    h = sha256_hex(token)
    why = "file_mismatch" if current else "file_missing"
    files.write_secret(path, token + "\n")
    async with store.write() as tx:
        dropped = tx.keep_only_admin_token(h, now)
        if hashes:
            tx.audit(now, "admin.token_replaced", "ok", why, detail=f"{dropped} invalidated")
    if hashes:
        _log.warning("admin.token_replaced", path=str(path), invalidated=dropped, why=why)
    else:
        _log.info("admin.token_created", path=str(path))
    return h


async def rotate(store: Store, data_dir: Path, now: float) -> tuple[str, wire.AdminToken]:
    """A new token, the only valid one once this returns: (its hash, the answer)."""
    token = _new_token()
    h = sha256_hex(token)
    path = data_dir / ADMIN_TOKEN_FILE
    async with store.write() as tx:
        dropped = tx.keep_only_admin_token(h, now)
        tx.audit(now, "admin.token_rotated", "ok", detail=f"{dropped} invalidated")
    try:
        files.write_secret(path, token + "\n")
    except OSError as e:
        # The answer still carries the token (a start that finds the file stale
        # would replace it again).
        _log.error("admin.token_file_failed", path=str(path), error=str(e))
    _log.warning("admin.token_rotated", path=str(path), invalidated=dropped)
    return h, wire.AdminToken(token=token, token_file=str(path))
