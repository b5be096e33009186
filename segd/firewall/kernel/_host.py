"""Before any kernel work: can this process do it, and is it the host's only agent?"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from segd import files
from segd.firewall.kernel import _ffi
from segd.firewall.kernel._nft import binary

BackendName = Literal["libnftables", "nsenter", "auto"]

_CAPS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}


def _missing_caps() -> list[str]:
    try:
        with open("/proc/self/status") as f:
            line = next((x for x in f if x.startswith("CapEff:")), "CapEff: 0")
        eff = int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        eff = 0
    return [name for name, bit in _CAPS.items() if not eff >> bit & 1]


def unavailable(backend: BackendName = "auto") -> str | None:
    """Why this process cannot enforce (one line), or None when it can.

    It needs CAP_NET_ADMIN and CAP_SYS_ADMIN (root) to enter namespaces and
    program nftables, and libnftables (or the `nft` and `nsenter` programs).
    """
    missing = _missing_caps()
    if missing:
        return f"needs root ({' and '.join(missing)}) to program nftables in namespaces"
    lib = backend != "nsenter" and _ffi.libnftables_available()
    if backend == "libnftables" and not lib:
        return f"cannot load {_ffi.LIBNFTABLES} (nftables is missing)"
    tools = [t for t in ("nft", "nsenter") if binary(t) is None]
    if not lib and tools:
        return f"nftables is missing ({' and '.join(tools)} not found)"
    return None


def take_host_lock(path: str) -> int:
    """Become the host's only agent, or exit with one line saying why not.

    The host gate is a single table in the host's namespace, and two agents
    would keep undoing each other's entries (`segd.agent.hostlock` names the
    lock of a namespace). Returns the lock's file descriptor: the lock holds
    until it is closed or the process ends.
    """
    problem = unavailable()
    if problem is not None:
        raise SystemExit(f"segd agent: cannot enforce: {problem}")
    fd = files.try_lock(Path(path))
    if fd is None:
        raise SystemExit(f"segd agent: another agent is running on this host ({path})")
    return fd
