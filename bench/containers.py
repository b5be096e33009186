"""Containers on the local Docker engine: start them with timings, watch their
`start` events, read their namespaces from outside, and clean up.

Every container carries `segd.bench=1`, `segd.bench.run=RUN` and
`segd.bench.pid=PID`: a later run removes what a killed run left behind, and
never the containers of a run whose process is still alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.stack import BenchError, wait_for

IMAGE = "segd-busybox:latest"
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"
LABEL = "segd.bench"


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    p = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise BenchError(f"docker {' '.join(args[:3])}...: {p.stderr.strip()}")
    return p.stdout.strip()


def require_docker() -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root")
    if shutil.which("nft") is None or shutil.which("nsenter") is None:
        raise BenchError("needs nft and nsenter (make host)")
    try:
        docker("info", timeout=30)
        docker("image", "inspect", IMAGE)
    except (BenchError, OSError, subprocess.TimeoutExpired) as e:
        raise BenchError(f"needs a running Docker engine and {IMAGE} (make host): {e}") from None


def remove_stale() -> int:
    """Remove bench containers whose run's process is gone; return how many."""
    out = docker(
        "ps", "-a", "--filter", f"label={LABEL}", "--format", '{{.ID}} {{.Label "segd.bench.pid"}}'
    )
    stale = []
    for line in out.splitlines():
        cid, _, pid = line.partition(" ")
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            stale.append(cid)
    if stale:
        docker("rm", "-f", *stale, check=False)
    return len(stale)


def foreign_keyed(run_id: str) -> list[str]:
    """Running containers with a pairing key that are not this run's: another segd
    stack uses this Docker engine, and its agent enforces our containers too."""
    out = docker(
        "ps",
        "--filter",
        "label=segd.pairing-key",
        "--format",
        '{{.ID}} {{.Label "segd.bench.run"}}',
        check=False,
    )
    return [line.split()[0] for line in out.splitlines() if line.split()[1:] != [run_id]]


class Events:
    """`docker events` for this run's containers: when each one started."""

    def __init__(self, run_id: str) -> None:
        self.starts: dict[str, float] = {}
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [
                DOCKER,
                "events",
                "--format",
                "{{json .}}",
                "--since",
                f"{time.time() - 1:.3f}",
                "--filter",
                "type=container",
                "--filter",
                "event=start",
                "--filter",
                f"label={LABEL}.run={run_id}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError, KeyError):
                ev = json.loads(line)
                cid = str(ev.get("id") or ev["Actor"]["ID"])
                with self._lock:
                    self.starts.setdefault(cid, int(ev["timeNano"]) / 1e9)

    def wait(self, cids: Sequence[str], timeout: float = 10) -> dict[str, float]:
        def have() -> bool:
            with self._lock:
                return all(c in self.starts for c in cids)

        with contextlib.suppress(BenchError):
            wait_for(have, timeout, "docker start events")
        with self._lock:
            return {c: self.starts[c] for c in cids if c in self.starts}

    def close(self) -> None:
        self._proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
        self._thread.join(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()


@dataclass(frozen=True)
class Started:
    id: str
    called: float  # when `docker run -d` was invoked
    returned: float  # when it returned


@dataclass
class Containers:
    """This run's containers on the local Docker engine."""

    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    ids: list[str] = field(default_factory=list)  # still present
    started: set[str] = field(default_factory=set)  # every id[:12] this run started
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, *, labels: Mapping[str, str] | None = None, cmd: str = "") -> Started:
        args = [
            "run",
            "-d",
            "--label",
            f"{LABEL}=1",
            "--label",
            f"{LABEL}.run={self.run_id}",
            "--label",
            f"{LABEL}.pid={os.getpid()}",
        ]
        for k, v in (labels or {}).items():
            args += ["--label", f"{k}={v}"]
        args += [IMAGE, "sh", "-c", cmd or "exec sleep 100000"]
        called = time.time()
        cid = docker(*args)
        returned = time.time()
        with self._lock:
            self.ids.append(cid)
            self.started.add(cid[:12])
        return Started(cid, called, returned)

    def foreign(self, denied: set[str]) -> list[str]:
        """Keyed containers of another segd stack, running now or refused pairing
        by our agent (`denied`): see `foreign_keyed`."""
        seen = set(foreign_keyed(self.run_id)) | (denied - self.started)
        return sorted(c[:12] for c in seen)

    def run_many(
        self, specs: Sequence[tuple[Mapping[str, str], str]], *, parallel: int
    ) -> list[Started]:
        """Start containers from (labels, cmd) with up to `parallel` `docker run` at once."""
        if parallel <= 1:
            return [self.run(labels=lab, cmd=cmd) for lab, cmd in specs]
        with ThreadPoolExecutor(parallel) as pool:
            return list(pool.map(lambda s: self.run(labels=s[0], cmd=s[1]), specs))

    def rm(self, cids: Sequence[str]) -> None:
        for i in range(0, len(cids), 25):
            docker("rm", "-f", *cids[i : i + 25], check=False)
        with self._lock:
            gone = set(cids)
            self.ids = [c for c in self.ids if c not in gone]

    def rm_all(self) -> None:
        self.rm(list(self.ids))

    @staticmethod
    def inspect(cids: Sequence[str]) -> dict[str, tuple[int, str]]:
        """Container id -> (pid, first IPv4 address)."""
        if not cids:
            return {}
        fmt = "{{.Id}} {{.State.Pid}} {{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
        out: dict[str, tuple[int, str]] = {}
        for line in docker("inspect", "-f", fmt, *cids).splitlines():
            parts = line.split()
            out[parts[0]] = (int(parts[1]), parts[2] if len(parts) > 2 else "")
        return out

    @staticmethod
    def logs(cid: str) -> str:
        return docker("logs", cid, check=False)


def table_in_netns(pid: int) -> str:
    """`list table inet segd` in a process's network namespace, read from outside."""
    p = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "nft", "list", "table", "inet", "segd"],
        capture_output=True,
        text=True,
        check=False,
    )
    return p.stdout if p.returncode == 0 else ""
