"""The multi-host test bed as a pytest fixture (segd.bed). Import `bed` into a
conftest to use it; a test module sets `BED_HOSTS = N` for other than three hosts.
Module scope: one bring-up per module, torn down (and checked clean) after it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from segd.bed import Bed
from tests.hostreq import bed_missing, require


@pytest.fixture(scope="module")
def bed(request: pytest.FixtureRequest) -> Iterator[Bed]:
    require(bed_missing())
    b = Bed.up(getattr(request.module, "BED_HOSTS", 3))
    try:
        yield b
    finally:
        left = b.down()
    assert left == [], f"the bed left: {left}"
