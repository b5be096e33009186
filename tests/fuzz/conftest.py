"""Fixtures for the fuzz tests: the in-process server of tests/api (with the
shortest long-poll the config allows), populated with something to break."""

from __future__ import annotations

from pathlib import Path

import pytest

from segd.config import MeshConfig, ServerConfig
from tests.api.conftest import (  # noqa: F401 (fixtures)
    MESH_POOL,
    Admin,
    Clock,
    api,
    clock,
    make_agent,
)
from tests.fuzz.harness import FUZZ_BURST, LONGPOLL_S, Env, populate


@pytest.fixture
def server_cfg(tmp_path: Path) -> ServerConfig:
    return ServerConfig(
        data_dir=str(tmp_path / "server"),
        longpoll_timeout_s=LONGPOLL_S,
        request_skew_s=60.0,
        rate_limit_burst=FUZZ_BURST,
        mesh=MeshConfig(pool=MESH_POOL),  # the mesh join route does more than refuse
    )


@pytest.fixture
async def env(api: Admin, clock: Clock) -> Env:  # noqa: F811 (the fixture above)
    return await populate(api, clock)
