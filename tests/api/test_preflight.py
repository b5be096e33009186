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


@pytest.mark.parametrize(
    ("setting", "kernel", "go", "refused"),
    [
        ("kernel", False, "/usr/bin/wireguard-go", True),
        ("userspace", True, None, True),
        ("auto", False, None, True),
        ("auto", False, "/usr/bin/wireguard-go", False),
    ],
)
def test_an_agent_in_the_mesh_without_its_wireguard_is_refused_before_it_starts(
    setting: str, kernel: bool, go: str | None, refused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import segd.firewall.kernel as fw
    from segd import config, preflight

    monkeypatch.setattr(fw, "kernel_has_wireguard", lambda: kernel)
    monkeypatch.setattr(fw, "wireguard_go", lambda: go)
    cfg = config.decode({"agent": {"mesh": {"enabled": True, "wireguard": setting}}})
    if refused:
        with pytest.raises(config.ConfigError, match=r"agent\.mesh\.wireguard"):
            preflight.check(cfg, "agent", "segd.toml")
    else:
        preflight.check(cfg, "agent", "segd.toml")
    lines, ok = preflight.agent_report(cfg.agent)
    assert ok is (not refused) or "enforcement: no" in lines[0]
    assert lines[1].startswith(f"mesh: enabled; wireguard = '{setting}' -> ")


def test_preflight_says_which_wireguard_the_agent_would_use() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "segd", "preflight"], capture_output=True, text=True, timeout=60
    )
    assert p.stdout.splitlines()[0].startswith("enforcement: ")
    assert p.stdout.splitlines()[1].startswith("mesh: disabled; wireguard = 'auto' -> ")
