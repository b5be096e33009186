"""Where `segd agent` takes its activation code from: the command line (where
every user of the host can read it), a file, or the environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from segd.cli import ACTIVATION_CODE_ENV, activation_code
from segd.config import ConfigError


def test_the_code_is_read_from_a_file(tmp_path: Path) -> None:
    f = tmp_path / "code"
    f.write_text("act_from_file\n")
    assert activation_code("", str(f), {}) == "act_from_file"


def test_the_code_is_read_from_the_environment() -> None:
    assert activation_code("", "", {ACTIVATION_CODE_ENV: "act_from_env"}) == "act_from_env"


def test_the_command_line_then_the_file_then_the_environment(tmp_path: Path) -> None:
    f = tmp_path / "code"
    f.write_text("act_file")
    env = {ACTIVATION_CODE_ENV: "act_env"}
    assert activation_code("act_flag", "", env) == "act_flag"
    assert activation_code("", str(f), env) == "act_file"
    assert activation_code("", "", {}) == ""  # then `[agent] activation_code`


@pytest.mark.parametrize("content", [None, "", "\n  \n", b"\xff\xfe"])
def test_an_unreadable_or_empty_code_file_is_refused(
    tmp_path: Path, content: str | bytes | None
) -> None:
    f = tmp_path / "code"
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    with pytest.raises(ConfigError, match="--activation-code-file"):
        activation_code("", str(f), {})


def test_segd_agent_refuses_a_missing_code_file_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    p = subprocess.run(
        [sys.executable, "-m", "segd", "agent", "--activation-code-file", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--activation-code-file" in lines[0] and str(missing) in lines[0]


def test_a_code_and_a_code_file_cannot_both_be_given(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "segd", "agent", "--activation-code", "x",
         "--activation-code-file", str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert p.returncode == 2 and "not allowed with" in p.stderr
