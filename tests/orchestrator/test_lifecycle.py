"""`segd orchestrator` as a process: config, readiness, SIGTERM drains in-flight
requests and exits 0, and the pairing key never appears in its log output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.orchestrator.background import Background
from tests.orchestrator.conftest import KEY, free_port, profile_body

ROOT = Path(__file__).parents[2]


def _request(url: str, token: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_ready(url: str, proc: subprocess.Popen[bytes], data_dir: Path) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, "orchestrator exited early"
        try:
            with urllib.request.urlopen(url + "/v1/health", timeout=2) as resp:
                if resp.status == 200:
                    return (data_dir / "admin.token").read_text().strip()
        except OSError:
            time.sleep(0.05)
    raise AssertionError("orchestrator did not become ready")


@pytest.fixture
def engine_bg(sock_dir: Path) -> Iterator[Background]:
    b = Background()
    try:
        b.start_engine(str(sock_dir / "docker.sock"))
        yield b
    finally:
        b.close()


def test_sigterm_drains_in_flight_requests(tmp_path: Path, engine_bg: Background) -> None:
    port = free_port()
    data_dir = tmp_path / "orch"
    cfg = tmp_path / "segd.toml"
    cfg.write_text(
        f'[log]\nformat = "json"\n\n[orchestrator]\nlisten = "127.0.0.1:{port}"\n'
        f'data_dir = "{data_dir}"\nregister_local_node = false\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "segd", "orchestrator", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        token = _wait_ready(url, proc, data_dir)
        assert engine_bg.engine is not None
        engine = engine_bg.engine
        status, _ = _request(
            url,
            token,
            "POST",
            "/v1/orch/nodes",
            {"name": "fake", "endpoint": "unix://" + engine.socket},
        )
        assert status == 201
        assert _request(url, token, "POST", "/v1/orch/profiles", profile_body())[0] == 201

        engine.create_delay = 1.0  # keep the next run in flight
        result: list[tuple[int, Any]] = []
        t = threading.Thread(
            target=lambda: result.append(
                _request(url, token, "POST", "/v1/orch/run", {"profile": "web"})
            )
        )
        t.start()
        deadline = time.monotonic() + 10
        while not engine.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        t.join(20)
        assert proc.wait(20) == 0
        [(status, started)] = result
        assert status == 201, started
        assert len(engine.running()) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = proc.communicate()
    text = err.decode()
    events = [json.loads(line)["event"] for line in text.splitlines() if line.startswith("{")]
    # The run finished after the stop began, and before the process stopped.
    order = [e for e in events if e.startswith(("orchestrator.", "container."))]
    assert order == [
        "orchestrator.listening",
        "orchestrator.stopping",
        "container.started",
        "orchestrator.stopped",
    ]
    assert KEY not in text and KEY not in out.decode()


def test_bad_config_is_refused_before_start(tmp_path: Path) -> None:
    cfg = tmp_path / "segd.toml"
    cfg.write_text('[orchestrator]\ndimensions = ["Bad"]\n')
    p = subprocess.run(
        [sys.executable, "-m", "segd", "orchestrator", "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert p.returncode == 2
    assert "orchestrator.dimensions" in p.stderr and "invalid label dimension" in p.stderr
