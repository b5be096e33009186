"""A `segd agent` running on one simulated host, as a process that tests can stop,
kill (SIGKILL, for fault tests) and start again with the same state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from segd.bed.system import BedError


class BedAgent:
    """One host's agent. Its files live in `workdir`: `agent.toml`, `state/` (key
    pair, identity, last instructions; kept across restarts) and `agent.log` (JSON
    lines, appended across restarts)."""

    def __init__(
        self, argv: Callable[[Sequence[str]], list[str]], workdir: Path, env: dict[str, str]
    ) -> None:
        self._enter = argv
        self.workdir = workdir
        self.config = workdir / "agent.toml"
        self.state_dir = workdir / "state"
        self.log_path = workdir / "agent.log"
        self._env = env
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self, *, wait: bool = True, timeout: float = 30) -> None:
        """Start the agent; with `wait`, until it has synced with the server once."""
        if self.running():
            raise BedError(f"agent in {self.workdir} is already running")
        before = self.count("agent.synced")
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in _reap)
        argv = [sys.executable, "-m", "segd", "agent", "--config", str(self.config)]
        self.popen = subprocess.Popen(
            self._enter(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._env,
            start_new_session=True,
        )
        if wait:
            self.wait_for(lambda: self.count("agent.synced") > before, timeout, "first sync")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        """Signal the agent and wait for it (SIGKILL after `timeout`); its exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self._reap()

    def kill(self) -> int | None:
        """SIGKILL: the agent gets no chance to clean up (what a crash looks like)."""
        return self.stop(signal.SIGKILL)

    def restart(self, *, wait: bool = True, timeout: float = 30) -> None:
        self.stop()
        self.start(wait=wait, timeout=timeout)

    def _reap(self) -> int | None:
        assert self.popen is not None
        rc = self.popen.returncode
        self.popen = None
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    # ---- what it logged ---------------------------------------------------------------

    def logs(self) -> list[dict[str, Any]]:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                out.append(entry)
        return out

    def count(self, event: str) -> int:
        return sum(1 for e in self.logs() if e.get("event") == event)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def wait_for(self, pred: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if self.popen is not None and self.popen.poll() is not None:
                raise BedError(f"agent exited ({what}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise BedError(f"agent: timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.05)


def agent_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    return env
