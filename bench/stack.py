"""The real stack for benchmarks: `segd server` and `segd agent` as processes,
what their logs say, and what they cost (RSS, CPU).

Times are wall-clock seconds (`time.time()`), the clock Docker's `timeNano`
and the agent's JSON log timestamps use too.
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
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from segd import wire
from segd.http.client import Client, ClientError

GATE = ("bridge", "segd_gate")
LOGS = Path(tempfile.gettempdir()) / "segd-bench-logs"  # the last run's process logs


class BenchError(Exception):
    """The benchmark could not run (missing prerequisite, a process died)."""


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


# ---- prerequisites and other agents ----------------------------------------------------


def require_kernel() -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root")
    for tool in ("ip", "nft", "nsenter"):
        if shutil.which(tool) is None:
            raise BenchError(f"needs {tool} (make host)")


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


def keep_logs(bench: str, *procs: Proc) -> str:
    """Copy the processes' logs to `LOGS` as `<bench>-<name>.log`; return the folder."""
    LOGS.mkdir(exist_ok=True)
    for p in procs:
        with contextlib.suppress(OSError):
            shutil.copyfile(p.log_path, LOGS / f"{bench}-{p.log_path.name}")
    return str(LOGS)


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
        """Start it; it gets SIGTERM if the starting thread dies (a killed benchmark
        must not leave an agent enforcing the host), through `setpriv` (which execs)."""
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        setpriv = shutil.which("setpriv")
        argv = [setpriv, "--pdeathsig", "TERM", "--", *self.argv] if setpriv else self.argv
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
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
    """User + system CPU seconds of a process (all its threads, those that ended
    too), in clock ticks (10 ms here)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads_cpu_s(pid: int) -> float:
    """CPU seconds of a process's running threads, to the nanosecond (the
    scheduler's own count): for runs too short for clock ticks. A thread that
    ended is not counted."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
    return total / 1e9


def segd_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "segd", *args]


class Server:
    """`segd server` on a free loopback port, with its admin API."""

    def __init__(self, root: Path, config: str = "") -> None:
        """`config`: the text of a TOML config file for it (none when empty)."""
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = root / "server"
        args = ["server", "--data-dir", str(data), "--listen", f"127.0.0.1:{self.port}"]
        if config:
            (root / "server.toml").write_text(config)
            args += ["--config", str(root / "server.toml")]
        self.proc = Proc(segd_argv(*args), root / "server.log")
        self.token = ""
        self._token_file = data / "admin.token"

    def start(self) -> None:
        self.proc.start()
        wait_for(self._healthy, 30, "segd server health", interval=0.05)
        self.token = self._token_file.read_text().strip()

    def _healthy(self) -> bool:
        self.proc.check_alive("segd server")
        try:
            Client(self.url, "", timeout=1).call("GET", "/v1/health")
            return True
        except ClientError:
            return False

    def stop(self) -> None:
        self.proc.stop()

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """One admin request (a body is a wire Struct or plain JSON values); its
        answer as plain JSON values; an error answer is a `BenchError`."""
        client = Client(self.url, self.token, timeout=30)
        try:
            return client.json(method, path, body)
        except ClientError as e:
            raise BenchError(f"{method} {path} -> {e.http} {e.code}: {e.message}") from None

    def rule(self, provider: Mapping[str, str], consumer: Mapping[str, str], *svc: str) -> None:
        body = wire.RuleIn(
            providers=[dict(provider)], consumers=[dict(consumer)], services=list(svc)
        )
        self.api("POST", "/v1/rules", body)

    def key(self, name: str, labels: Mapping[str, str], *, max_uses: int = 10_000) -> str:
        profile = wire.ProfileIn(
            name=name,
            labels=dict(labels),
            locked=sorted(labels),
            max_uses=max_uses,
            lifespan_s=86400,
        )
        self.api("POST", "/v1/profiles", profile)
        return str(self.api("POST", "/v1/keys", wire.KeyIssueIn(profile=name))["token"])

    def workload_count(self) -> int:
        return len(self.api("GET", "/v1/workloads"))


@dataclass
class Counts:
    """How much work the agent's log shows: pairings, instruction versions it
    accepted (with the workloads each held) and per-container converges."""

    paired: int = 0
    versions: int = 0
    workloads: int = 0  # summed over accepted versions
    converges: int = 0

    def see(self, rec: Mapping[str, Any]) -> None:
        ev = rec.get("event")
        if ev == "workload.paired":
            self.paired += 1
        elif ev == "instructions.accepted":
            self.versions += 1
            self.workloads += int(rec.get("workloads") or 0)
        elif ev == "enforce.done":
            self.converges += 1

    def since(self, before: Counts) -> Counts:
        return Counts(
            self.paired - before.paired,
            self.versions - before.versions,
            self.workloads - before.workloads,
            self.converges - before.converges,
        )


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
        self.errors: list[str] = []  # "event: error" of every error line
        self.denied: set[str] = set()  # container id[:12] the server refused to pair
        self.counts = Counts()

    def start(self) -> None:
        code = self.server.api("POST", "/v1/activation-codes", wire.ActivationCodeIn())["code"]
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

    def error_summary(self) -> dict[str, Any]:
        """Error lines by event, and the last few in full."""
        by_event: dict[str, int] = {}
        for e in self.errors:
            ev = e.split(":", 1)[0]
            by_event[ev] = by_event.get(ev, 0) + 1
        return {"by_event": by_event, "last": self.errors[-10:]}

    def poll(self) -> None:
        """Read the log lines the agent wrote since the last poll; raise if it died."""
        for rec in self.tail.read():
            ev = rec.get("event")
            self.counts.see(rec)
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
