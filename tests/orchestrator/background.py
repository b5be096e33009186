"""An event loop in a thread, hosting an orchestrator and/or a fake Docker engine,
so synchronous clients (`segd ctl orch`, urllib) can be tested against them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from segd.config import OrchestratorConfig
from segd.orchestrator.app import OrchestratorServer
from tests.orchestrator.fake_engine import FakeEngine

T = TypeVar("T")


class Background:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.engine: FakeEngine | None = None
        self.server: OrchestratorServer | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_engine(self, socket_path: str) -> FakeEngine:
        self.engine = FakeEngine()
        self.run(self.engine.start(socket_path))
        return self.engine

    def start_orchestrator(self, cfg: OrchestratorConfig) -> str:
        """Start it; return its base URL."""
        self.server = OrchestratorServer(cfg)
        self.run(self.server.start())
        host, port = self.server.addresses[0]
        return f"http://{host}:{port}"

    @property
    def token_file(self) -> Path:
        assert self.server is not None
        return Path(self.server.cfg.data_dir) / "admin.token"

    def close(self) -> None:
        try:
            if self.server is not None:
                self.run(self.server.stop())
            if self.engine is not None:
                self.run(self.engine.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
