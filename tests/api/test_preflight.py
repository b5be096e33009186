"""A daemon that cannot start says why in one line and creates nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("mode", ["server", "orchestrator", "allinone"])
def test_busy_listen_address_is_refused_before_anything_is_made(mode: str, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        data = tmp_path / "data"
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "segd",
                mode,
                "--data-dir",
                str(data),
                "--listen",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "already in use" in lines[0] and "listen" in lines[0], p.stderr
    assert not data.exists()


def test_unreadable_agent_ca_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "segd.toml"
    cfg.write_text(f'[agent]\nserver_ca = "{tmp_path / "missing-ca.pem"}"\n')
    p = subprocess.run(
        [sys.executable, "-m", "segd", "agent", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert "agent.server_ca" in p.stderr and str(cfg) in p.stderr
