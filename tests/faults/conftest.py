"""Fixtures for fault tests: real `segd server` processes, stopped on teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.proc import ServerProcess

MakeServer = Callable[..., ServerProcess]


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[MakeServer]:
    """Make (not start) server processes; each is stopped at teardown."""
    made: list[ServerProcess] = []

    def make(data_dir: Path | None = None, name: str = "server") -> ServerProcess:
        s = ServerProcess(data_dir or tmp_path / name, tmp_path / f"{name}.log")
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
