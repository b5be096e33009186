"""What the benchmark smoke tests need: root, Docker and the local image, or nftables.

Under CI, or with SEGD_REQUIRE_DOCKER=1, a missing piece is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

IMAGE = "segd-busybox:latest"


def _skip_or_fail(why: str) -> None:
    if os.environ.get("CI") or os.environ.get("SEGD_REQUIRE_DOCKER"):
        pytest.fail(why)
    pytest.skip(why)


def _run_ok(*argv: str) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def kernel_ready() -> None:
    if os.geteuid() != 0:
        _skip_or_fail("needs root (network namespaces, nftables)")
    for tool in ("ip", "nft", "nsenter"):
        if shutil.which(tool) is None:
            _skip_or_fail(f"needs {tool} (make host)")


@pytest.fixture
def docker_ready(kernel_ready: None) -> None:
    if not _run_ok("docker", "info"):
        _skip_or_fail("needs a running Docker engine (make host)")
    if not _run_ok("docker", "image", "inspect", IMAGE):
        _skip_or_fail(f"needs the {IMAGE} image (make host)")
