"""Files that must survive a crash, and exclusive locks.

Every file segd writes for itself (keys, tokens, the agent's identity and
last instructions) goes through `write_atomic`: a new temporary file (never
one that exists, never through a symbolic link), fsynced, renamed into place,
and the directory fsynced so the rename survives a power cut. `create_file`
makes a file only where nothing is (a signing key is never replaced).
`try_lock` takes an exclusive lock file (a data dir, the host's agent).
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path


def write_secret(path: Path, text: str) -> None:
    """Write a small secret file 0600, atomically and durably."""
    write_atomic(path, text.encode(), 0o600)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` by a file holding `data`: written to a new temporary file
    (never one that exists, never through a symbolic link), fsynced, renamed over
    `path`, and the directory fsynced so the rename survives a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def create_file(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Create `path` holding `data` unless something exists there (it is never
    replaced); durably. True when this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file(path, data, mode)
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)
    return True


def _new_file(path: Path, data: bytes, mode: int) -> Path:
    """A new temporary file next to `path` holding `data`, fsynced."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def try_lock(path: Path) -> int | None:
    """Lock `path` (created 0600) exclusively: its descriptor, held until closed
    or the process ends; None when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
