"""`segd server` as a real process: start it, wait until it answers, kill it.

server = ServerProcess(tmp_path / "data", tmp_path / "server.log")
server.start()
ServerProcess(..., config=PATH, nofile=1024)   # a config file; an open-files limit
... server.url, server.token ...
server.kill()          # SIGKILL: no chance to flush or drain
server.start()         # the same data dir and port
assert server.terminate() == 0
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from segd.config import ADMIN_TOKEN_FILE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        *,
        port: int = 0,
        config: Path | None = None,
        nofile: int = 0,
        nofile_hard: int = 0,
    ) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.config = config
        self.nofile = nofile  # soft RLIMIT_NOFILE of the process (0: inherited) ...
        self.nofile_hard = nofile_hard or nofile  # ... and hard (default: the same)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def token(self) -> str:
        return (self.data_dir / ADMIN_TOKEN_FILE).read_text().strip()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait until /v1/health answers."""
        assert self.popen is None or self.popen.poll() is not None, "already running"
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "segd",
                    "server",
                    *(["--config", str(self.config)] if self.config else []),
                    "--data-dir",
                    str(self.data_dir),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
                preexec_fn=self._limit if self.nofile else None,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/v1/health", timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError):
                if self.popen.poll() is not None:
                    raise RuntimeError(f"server exited: {self.log_tail()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not come up: {self.log_tail()}") from None
                time.sleep(0.05)

    def _limit(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile_hard))

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to flush, drain or close anything."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout)

    def stop(self) -> None:
        """Teardown: terminate, and kill when that does not work in time."""
        if self.popen is None or self.popen.poll() is not None:
            return
        try:
            self.terminate(15)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""
