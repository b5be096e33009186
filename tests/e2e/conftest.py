"""Fixtures for end-to-end tests on the real Docker engine and real nftables.

These need root, dockerd and the local busybox image (`make host` provides all
three). Under CI, or with SEGD_REQUIRE_DOCKER=1, a missing piece is a failure,
not a skip: the tier that says "it works" must run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import DOCKER, IMAGE, TEST_LABEL, Stack, docker


def _missing() -> str:
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("nft"):
        return "needs nftables (make host)"
    try:
        docker("info", timeout=20)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"needs a running Docker engine (make host): {e}"
    try:
        docker("image", "inspect", IMAGE)
    except RuntimeError:
        return f"needs the {IMAGE} image (make host)"
    return ""


@pytest.fixture(scope="session")
def docker_host() -> str:
    why = _missing()
    if why:
        if os.environ.get("CI") or os.environ.get("SEGD_REQUIRE_DOCKER"):
            pytest.fail(why)
        pytest.skip(why)
    # Leftovers of an earlier, killed run.
    stale = docker("ps", "-aq", "--filter", f"label={TEST_LABEL}", check=False).split()
    if stale:
        docker("rm", "-f", *stale, check=False)
    return DOCKER


@pytest.fixture
def stack(docker_host: str, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.close()
        subprocess.run(["nft", "delete", "table", "bridge", "segd_gate"], capture_output=True)
