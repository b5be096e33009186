"""Thin adapters over the machine for the bed: commands, processes, namespaces,
mounts and cgroups, read from /proc and /sys."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


class BedError(Exception):
    """The bed could not be brought up (the message says what and why)."""


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        p = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BedError(f"{' '.join(argv)}: {e}") from None
    if check and p.returncode != 0:
        raise BedError(f"{' '.join(argv)}: {p.stderr.strip() or f'exit {p.returncode}'}")
    return p


def inode(path: str | Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    zombie: bool
    argv: tuple[str, ...]
    net: int | None
    mnt: int | None


def read_proc(pid: int) -> Proc | None:
    base = f"/proc/{pid}"
    try:
        with open(f"{base}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"{base}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2 :].split()  # the command name may contain anything
    argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    return Proc(
        pid=pid,
        ppid=int(rest[1]),
        zombie=rest[0] in ("Z", "X"),
        argv=argv,
        net=inode(f"{base}/ns/net"),
        mnt=inode(f"{base}/ns/mnt"),
    )


def processes() -> list[Proc]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = read_proc(int(name))
            if p is not None:
                out.append(p)
    return out


def ancestors(procs: Iterable[Proc], pid: int) -> set[int]:
    """`pid` and every process above it."""
    parent = {p.pid: p.ppid for p in procs}
    seen = set()
    while pid and pid not in seen:
        seen.add(pid)
        pid = parent.get(pid, 0)
    return seen


def descendants(procs: Iterable[Proc], roots: set[int]) -> set[int]:
    """`roots` and everything below them."""
    children: dict[int, list[int]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo += children.get(pid, [])
    return out


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def kill_and_wait(pids: Iterable[int], timeout: float = 10) -> list[int]:
    """SIGKILL `pids`; the ones still alive (not even zombies) after `timeout`."""
    pids = set(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if (p := read_proc(pid)) is not None and not p.zombie]
        if not alive or time.monotonic() > deadline:
            return sorted(alive)
        time.sleep(0.02)


def rss_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# ---- mounts and cgroups -----------------------------------------------------------------


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str


def mounts() -> list[Mount]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) >= 5 and right:
            out.append(Mount(_unescape(fields[4]), right.split()[0]))
    return out


def cgroup_dirs(prefix: str) -> list[Path]:
    """Top-level cgroups named `prefix*` in every cgroup hierarchy (v1 and v2)."""
    out = []
    for m in mounts():
        if m.fstype not in ("cgroup", "cgroup2"):
            continue
        try:
            names = os.listdir(m.point)
        except OSError:
            continue
        out += [Path(m.point, n) for n in names if n.startswith(prefix)]
    return [d for d in out if d.is_dir()]


def cgroup_pids(top: Path) -> set[int]:
    pids = set()
    for dirpath, _, files in os.walk(top):
        if "cgroup.procs" in files:
            try:
                pids |= {int(x) for x in Path(dirpath, "cgroup.procs").read_text().split()}
            except (OSError, ValueError):
                continue
    return pids


def remove_cgroup(top: Path) -> None:
    """rmdir a cgroup and its children, deepest first (their files go with them)."""
    for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            pass
        except OSError:
            time.sleep(0.05)  # tasks leave a cgroup moments after they die
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
