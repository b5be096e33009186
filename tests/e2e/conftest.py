"""Fixtures for end-to-end tests on the real Docker engine and real nftables
(host requirements: tests/hostreq.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import DOCKER, TEST_LABEL, Stack, docker
from tests.hostreq import docker_missing, require


@pytest.fixture(scope="session")
def docker_host() -> str:
    require(docker_missing())
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
