"""The C functions segd calls: `setns(2)` and `malloc_trim(3)` from libc, and libnftables.

The only module in segd that imports ctypes. Libraries load on first use.
"""

from __future__ import annotations

import ctypes
import functools
import os

from segd.firewall.kernel._errors import NftError

CLONE_NEWNET = 0x40000000

# libnftables.h
_CTX_DEFAULT = 0
_OUTPUT_STATELESS = 1 << 2

LIBNFTABLES = "libnftables.so.1"


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.setns.restype = ctypes.c_int
    return libc


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open as `fd`."""
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def malloc_trim() -> None:
    """Return freed heap to the system (glibc only; elsewhere nothing)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _nftables() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(LIBNFTABLES)
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
    return _nftables() is not None


class NftContext:
    """One libnftables context, bound to the calling thread's current namespace.

    A context's netlink socket binds to the network namespace that is current
    *for the calling thread* when the context is created, and keeps it (and
    pins it) until freed; switching the thread's namespace later changes
    nothing. Output is stateless (no counters).
    """

    def __init__(self) -> None:
        lib = _nftables()
        if lib is None:
            raise NftError(f"cannot load {LIBNFTABLES}")
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
        """Run `script` (one transaction); nft's output, or NftError."""
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
