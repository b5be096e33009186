"""Run nftables scripts in one network namespace: libnftables or `nft` in a subprocess.

`LibNft` is a ctypes binding to `libnftables.so.1`. A context's netlink socket
binds to the network namespace that is current *for the calling thread* when
the context is created, and keeps it (and pins it) until freed; switching the
thread's namespace later changes nothing. `NsenterNft` runs
`nsenter --net=... nft -f -` per call (or plain `nft -f -` for the current
namespace): ten times slower, but needs no library. Both list stateless.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from typing import Protocol

# libnftables.h
_CTX_DEFAULT = 0
_OUTPUT_STATELESS = 1 << 2

_LIBRARY = "libnftables.so.1"


class NftError(Exception):
    """nft refused a script; the message is nft's own error text."""


class NftBackend(Protocol):
    """nftables bound to one network namespace."""

    name: str

    def run(self, script: str) -> str:
        """Run one script as one transaction; return nft's output."""
        ...

    def close(self) -> None: ...


@functools.cache
def _load() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(_LIBRARY)
    except OSError:
        return None
    vp, cp, ci = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    lib.nft_ctx_new.argtypes, lib.nft_ctx_new.restype = [ctypes.c_uint32], vp
    lib.nft_ctx_free.argtypes, lib.nft_ctx_free.restype = [vp], None
    lib.nft_ctx_buffer_output.argtypes, lib.nft_ctx_buffer_output.restype = [vp], ci
    lib.nft_ctx_buffer_error.argtypes, lib.nft_ctx_buffer_error.restype = [vp], ci
    lib.nft_ctx_get_output_buffer.argtypes, lib.nft_ctx_get_output_buffer.restype = [vp], cp
    lib.nft_ctx_get_error_buffer.argtypes, lib.nft_ctx_get_error_buffer.restype = [vp], cp
    lib.nft_ctx_output_set_flags.argtypes = [vp, ctypes.c_uint]
    lib.nft_ctx_output_set_flags.restype = None
    lib.nft_run_cmd_from_buffer.argtypes, lib.nft_run_cmd_from_buffer.restype = [vp, cp], ci
    return lib


def libnftables_available() -> bool:
    return _load() is not None


class LibNft:
    """One libnftables context, bound to the calling thread's current namespace."""

    name = "libnftables"

    def __init__(self) -> None:
        lib = _load()
        if lib is None:
            raise NftError(f"cannot load {_LIBRARY}")
        ctx = lib.nft_ctx_new(_CTX_DEFAULT)
        if not ctx:
            raise NftError("nft_ctx_new failed")
        if lib.nft_ctx_buffer_output(ctx) != 0 or lib.nft_ctx_buffer_error(ctx) != 0:
            lib.nft_ctx_free(ctx)
            raise NftError("cannot buffer libnftables output")
        lib.nft_ctx_output_set_flags(ctx, _OUTPUT_STATELESS)
        self._lib = lib
        self._ctx: int | None = ctx

    def run(self, script: str) -> str:
        if self._ctx is None:
            raise NftError("libnftables context is closed")
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
        # Reading a buffer also rewinds it for the next command: always read both.
        out: bytes = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
        err: bytes = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        if rc != 0:
            raise NftError(err.decode(errors="replace").strip() or f"nft failed ({rc})")
        return out.decode(errors="replace")

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


def _binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        raise NftError(f"{name} not found")
    return path


class NsenterNft:
    """`nft -f -` in a subprocess, entered into the namespace of `ns_fd`.

    Takes ownership of `ns_fd` (which pins the namespace) and passes it to the
    child as `/proc/self/fd/N`, so a recycled PID cannot redirect it. With
    `ns_fd=None`, runs in the caller's own namespace.
    """

    name = "nsenter"

    def __init__(self, ns_fd: int | None) -> None:
        nft = _binary("nft")
        self._fd = ns_fd
        self._closed = False
        if ns_fd is None:
            self._cmd = [nft, "-s", "-f", "-"]
        else:
            self._cmd = [_binary("nsenter"), f"--net=/proc/self/fd/{ns_fd}", nft, "-s", "-f", "-"]

    def run(self, script: str) -> str:
        if self._closed:
            raise NftError("nsenter backend is closed")
        proc = subprocess.run(
            self._cmd,
            input=script,
            capture_output=True,
            text=True,
            pass_fds=() if self._fd is None else (self._fd,),
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"},
            check=False,
        )
        if proc.returncode != 0:
            raise NftError(proc.stderr.strip() or f"nft exited with {proc.returncode}")
        return proc.stdout

    def close(self) -> None:
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
