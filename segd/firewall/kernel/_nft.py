"""Run nftables scripts in one network namespace: libnftables or `nft` in a subprocess.

`LibNft` is a libnftables context (`_ffi.NftContext`), bound to the namespace
the calling thread is in when it is made. `NsenterNft` runs
`nsenter --net=... nft -f -` per call (or plain `nft -f -` for the current
namespace): ten times slower, but needs no library. Both list stateless.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Protocol

from segd.firewall.kernel._errors import NftError
from segd.firewall.kernel._ffi import NftContext

_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class NftBackend(Protocol):
    """nftables bound to one network namespace."""

    name: str

    def run(self, script: str) -> str:
        """Run one script as one transaction; return nft's output."""
        ...

    def close(self) -> None: ...


class LibNft(NftContext):
    """One libnftables context, bound to the calling thread's current namespace."""

    name = "libnftables"


def binary(name: str) -> str | None:
    """The path of a program, on PATH or in the usual system directories."""
    return shutil.which(name) or shutil.which(name, path=_PATH)


def _require(name: str) -> str:
    path = binary(name)
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
        nft = _require("nft")
        self._fd = ns_fd
        self._closed = False
        if ns_fd is None:
            self._cmd = [nft, "-s", "-f", "-"]
        else:
            self._cmd = [_require("nsenter"), f"--net=/proc/self/fd/{ns_fd}", nft, "-s", "-f", "-"]

    def run(self, script: str) -> str:
        if self._closed:
            raise NftError("nsenter backend is closed")
        proc = subprocess.run(
            self._cmd,
            input=script,
            capture_output=True,
            text=True,
            pass_fds=() if self._fd is None else (self._fd,),
            env={"PATH": _PATH, "LC_ALL": "C"},
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
