"""The real stack for benchmarks: `segd server` and `segd agent` as processes,
containers on the Docker engine, and what we read from outside them.

Times are wall-clock seconds (`time.time()`), the clock Docker's `timeNano`
and the agent's JSON log timestamps use too. Every container carries
`segd.bench=1`, `segd.bench.run=RUN` and `segd.bench.pid=PID`: a later run
removes what a killed run left behind, and never the containers of a run
whose process is still alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

IMAGE = "segd-busybox:latest"
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"
LABEL = "segd.bench"
GATE = ("bridge", "segd_gate")


class BenchError(Exception):
    """The benchmark could not run (missing prerequisite, a process died)."""


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    p = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise BenchError(f"docker {' '.join(args[:3])}...: {p.stderr.strip()}")
    return p.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def iso_ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# ---- prerequisites and leftovers -------------------------------------------------------


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


def require_kernel() -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root")
    for tool in ("ip", "nft", "nsenter"):
        if shutil.which(tool) is None:
            raise BenchError(f"needs {tool} (make host)")


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


def other_agents(mine: Iterable[int] = ()) -> list[int]:
    """PIDs of segd agents (or allinone) not started by this run: they share the gate."""
    skip = set(mine) | {os.getpid()}
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in skip:
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        is_segd = any(w == "segd" or w.endswith("/segd") for w in words)
        if is_segd and ("agent" in words or "allinone" in words):
            found.append(int(d.name))
    return found


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


def drop_gate() -> None:
    """Delete the host gate table (only call when no other agent is running)."""
    subprocess.run(["nft", "delete", "table", *GATE], capture_output=True, check=False)


# ---- processes -------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process with stdout and stderr in one log file."""

    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def check_alive(self, what: str) -> None:
        if self.popen is None or self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"{what} exited:\n{tail}")

    def stop(self, timeout: float = 15) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.popen = None


class LogTail:
    """The JSON lines a log file gained since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pos = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self._pos += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def segd_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "segd", *args]


class Server:
    """`segd server` on a free loopback port, with its admin API."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = root / "server"
        self.proc = Proc(
            segd_argv("server", "--data-dir", str(data), "--listen", f"127.0.0.1:{self.port}"),
            root / "server.log",
        )
        self.token = ""
        self._token_file = data / "admin.token"

    def start(self) -> None:
        self.proc.start()
        wait_for(self._healthy, 30, "segd server health", interval=0.05)
        self.token = self._token_file.read_text().strip()

    def _healthy(self) -> bool:
        self.proc.check_alive("segd server")
        try:
            with urllib.request.urlopen(self.url + "/v1/health", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.stop()

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise BenchError(f"{method} {path} -> {e.code}: {e.read().decode()}") from None
        return json.loads(raw) if raw else None

    def rule(self, provider: Mapping[str, str], consumer: Mapping[str, str], *svc: str) -> None:
        self.api(
            "POST",
            "/v1/rules",
            {"providers": [dict(provider)], "consumers": [dict(consumer)], "services": list(svc)},
        )

    def key(self, name: str, labels: Mapping[str, str], *, max_uses: int = 10_000) -> str:
        self.api(
            "POST",
            "/v1/profiles",
            {
                "name": name,
                "labels": dict(labels),
                "locked": sorted(labels),
                "max_uses": max_uses,
                "lifespan_s": 86400,
            },
        )
        return str(self.api("POST", "/v1/keys", {"profile": name})["token"])

    def workload_count(self) -> int:
        return len(self.api("GET", "/v1/workloads"))


class Agent:
    """`segd agent` with JSON debug logs, and what those logs say it enforced."""

    def __init__(self, root: Path, server: Server, *, reconcile_s: float = 30.0) -> None:
        self.server = server
        state = root / "agent"
        self.config = root / "agent.toml"
        self.config.write_text(
            '[log]\nlevel = "debug"\nformat = "json"\n\n[agent]\n'
            f'server = "{server.url}"\nstate_dir = "{state}"\n'
            f"reconcile_interval_s = {reconcile_s}\nbackoff_max_s = 2.0\n"
        )
        self.proc = Proc(segd_argv("agent", "--config", str(self.config)), root / "agent.log")
        self.tail = LogTail(self.proc.log_path)
        self.enforced: dict[str, float] = {}  # container id[:12] -> first workload table
        self.isolated: dict[str, float] = {}  # container id[:12] -> first isolation table
        self.paired: dict[str, float] = {}  # container id[:12] -> server's answer arrived
        self.synced = 0
        self.errors: list[str] = []
        self.denied: set[str] = set()  # container id[:12] the server refused to pair

    def start(self) -> None:
        code = self.server.api("POST", "/v1/activation-codes", {})["code"]
        self.proc.argv.append(f"--activation-code={code}")
        self.proc.start()
        wait_for(self._synced, 60, "agent first sync", interval=0.05)

    def _synced(self) -> bool:
        self.poll()
        return self.synced > 0

    def stop(self) -> None:
        self.proc.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> None:
        """Read the log lines the agent wrote since the last poll; raise if it died."""
        for rec in self.tail.read():
            ev = rec.get("event")
            if ev == "enforce.done":
                cid, ts = str(rec.get("container", "")), iso_ts(str(rec["timestamp"]))
                book = self.enforced if rec.get("kind") == "workload" else self.isolated
                book.setdefault(cid, ts)
            elif ev == "workload.paired":
                self.paired.setdefault(str(rec.get("container", "")), iso_ts(str(rec["timestamp"])))
            elif ev == "pairing.denied":
                self.denied.add(str(rec.get("container", "")))
            elif ev == "agent.synced":
                self.synced += 1
            elif rec.get("level") == "error":
                self.errors.append(f"{ev}: {rec.get('error', '')}")
        self.proc.check_alive("segd agent")

    def wait_enforced(self, cids: Sequence[str], timeout: float) -> list[str]:
        """Wait until every container has its workload table; return those that did not."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            missing = [c for c in cids if c[:12] not in self.enforced]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.003)


# ---- Docker ----------------------------------------------------------------------------


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

    def foreign(self, agent: Agent) -> list[str]:
        """Keyed containers of another segd stack seen now or by our agent (see
        `foreign_keyed`): their figures may be disturbed."""
        seen = set(foreign_keyed(self.run_id)) | (agent.denied - self.started)
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
