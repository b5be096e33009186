"""What the benchmark smoke tests need: root, Docker and the local image, nftables, or the test bed.

The checks live in tests/hostreq.py; under CI, or with SEGD_REQUIRE_DOCKER=1, a
missing piece is a failure, not a skip.
"""

from __future__ import annotations

import pytest

from tests.hostreq import docker_missing, kernel_missing, mesh_missing, require


@pytest.fixture
def kernel_ready() -> None:
    require(kernel_missing())


@pytest.fixture
def docker_ready() -> None:
    require(docker_missing())


@pytest.fixture
def bed_ready() -> None:
    require(mesh_missing())
