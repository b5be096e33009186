"""The systemd units pass `systemd-analyze verify` and carry the hardening."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).parents[2] / "systemd").glob("*.service"))


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


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
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
