"""The systemd units pass `systemd-analyze verify` and carry the hardening."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).parents[2] / "systemd").glob("*.service"))
BOOT_GATE = "segd-gate.service"  # a one-shot at boot, before Docker
DAEMONS = [u for u in UNITS if u.name != BOOT_GATE]


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze missing (scripts/host-setup.sh installs systemd)")
        pytest.skip("systemd-analyze missing")
    return exe


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    exe = _analyze()
    segd = Path(sys.executable).with_name("segd")
    assert segd.exists(), "the segd console script is installed in the venv"
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/usr/local/bin/segd", str(segd)))
    p = subprocess.run(
        [exe, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    problems = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert p.returncode == 0 and not problems, problems


@pytest.mark.parametrize("unit", DAEMONS, ids=lambda p: p.name)
def test_unit_hardening(unit: Path) -> None:
    text = unit.read_text()
    for line in (
        "Type=notify",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=",
        "CapabilityBoundingSet=",
        "UMask=0077",
    ):
        assert line in text, f"{unit.name} lacks {line}"
    if unit.name in ("segd-server.service", "segd-orchestrator.service"):
        assert "CapabilityBoundingSet=\n" in text, "control-plane units keep no capabilities"
        assert "User=segd" in text


def test_the_boot_gate_goes_in_before_docker_starts_a_container() -> None:
    (unit,) = [u for u in UNITS if u.name == BOOT_GATE]
    text = unit.read_text()
    for line in (
        "Type=oneshot",
        "RemainAfterExit=yes",
        "ExecStart=/usr/local/bin/segd boot-gate",
        "DefaultDependencies=no",
        "Before=docker.service segd-agent.service",
        "WantedBy=docker.service",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_SYS_ADMIN",
        "UMask=0077",
    ):
        assert line in text, f"{unit.name} lacks {line}"


@pytest.mark.parametrize("unit", DAEMONS, ids=lambda p: p.name)
def test_every_unit_sets_its_open_files_limit(unit: Path) -> None:
    """Soft and hard alike (one value), far above the 1,024 a unit gets by default,
    so a client's idle connections cannot use up the listener's and the store's."""
    settings = [ln.split("=", 1)[1] for ln in unit.read_text().splitlines() if "LimitNOFILE=" in ln]
    assert len(settings) == 1, f"{unit.name}: one LimitNOFILE"
    assert ":" not in settings[0] and int(settings[0]) >= 16384, settings


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_a_filtered_system_call_fails_instead_of_killing(unit: Path) -> None:
    """segd raises its soft open-files limit when it can; under a filter that
    denies setrlimit that must be an error it handles, not SIGSYS."""
    text = unit.read_text()
    if "SystemCallFilter=" in text:
        assert "SystemCallErrorNumber=EPERM" in text
