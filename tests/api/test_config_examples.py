"""The example policies in config/ run cleanly against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.conftest import LiveServer

SCRIPTS = sorted((Path(__file__).parents[2] / "config").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_policy_applies(script: Path, live_server: LiveServer) -> None:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SEGD_SERVER": live_server.url,
        "SEGD_TOKEN": live_server.token_file.read_text().strip(),
    }
    p = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rules = subprocess.run(
        ["segd", "ctl", "rule", "list", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert len(json.loads(rules.stdout)) >= 2
