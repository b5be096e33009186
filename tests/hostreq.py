"""What the real-stack tiers need from the host, checked once, in one place.

Without root, nftables, a running Docker engine or the local image a test is
skipped; under CI, or with SEGD_REQUIRE_DOCKER=1, it fails instead: the tier
that says "it works" must run (`make host` provides all of it).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

IMAGE = "segd-busybox:latest"
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"


def _ok(*argv: str) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def kernel_missing() -> str:
    """Why namespace and nftables tests cannot run here ("" when they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    for tool in ("ip", "nft", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool} (make host)"
    return ""


def docker_missing() -> str:
    """Why Docker tests cannot run here ("" when they can)."""
    why = kernel_missing()
    if why:
        return why
    if not _ok(DOCKER, "info"):
        return "needs a running Docker engine (make host)"
    if not _ok(DOCKER, "image", "inspect", IMAGE):
        return f"needs the {IMAGE} image (make host)"
    return ""


def bed_missing() -> str:
    """Why the multi-host test bed (segd.bed) cannot run here ("" when it can)."""
    why = docker_missing()
    if why:
        return why
    for tool in ("dockerd", "unshare", "busybox", "iptables"):
        if shutil.which(tool) is None:
            return f"the test bed needs {tool} (make host)"
    return ""


def mesh_missing() -> str:
    """Why segd mesh tests cannot run here ("" when they can): the kernel tier plus
    a WireGuard (wireguard-go here: these kernels have none) and tcpdump."""
    why = kernel_missing()
    if why:
        return why
    if shutil.which("wireguard-go") is None:
        return "the segd mesh tests need wireguard-go (make host)"
    if shutil.which("tcpdump") is None:
        return "the segd mesh tests need tcpdump (make host)"
    return ""


def require(why: str) -> None:
    """Skip (or, under CI, fail) when `why` says something is missing."""
    if not why:
        return
    if os.environ.get("CI") or os.environ.get("SEGD_REQUIRE_DOCKER"):
        pytest.fail(why)
    pytest.skip(why)
