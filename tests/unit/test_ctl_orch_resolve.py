"""`segd ctl orch` finds an all-in-one's orchestrator with no flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from segd.ctl import orch


def test_allinone_dir_is_found_when_no_standalone_orchestrator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "orchestrator").mkdir()
    (tmp_path / "orchestrator" / "admin.token").write_text("tok-aio\n")
    monkeypatch.setenv("SEGD_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("SEGD_ORCH_SERVER", raising=False)
    monkeypatch.delenv("SEGD_ORCH_TOKEN", raising=False)
    monkeypatch.setattr(orch, "DEFAULT_TOKEN_FILE", str(tmp_path / "absent" / "admin.token"))
    assert orch.resolve_server(None, None) == orch.ALLINONE_SERVER
    assert orch.resolve_token(None, None) == "tok-aio"
    # Explicit choices still win.
    assert orch.resolve_server("http://10.0.0.1:7401", None) == "http://10.0.0.1:7401"


def test_standalone_orchestrator_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "orch" / "admin.token"
    token.parent.mkdir()
    token.write_text("tok-standalone")
    monkeypatch.setattr(orch, "DEFAULT_TOKEN_FILE", str(token))
    monkeypatch.setenv("SEGD_DATA_DIR", str(tmp_path / "no-allinone"))
    monkeypatch.delenv("SEGD_ORCH_SERVER", raising=False)
    monkeypatch.delenv("SEGD_ORCH_TOKEN", raising=False)
    assert orch.resolve_server(None, None) == orch.DEFAULT_SERVER
    assert orch.resolve_token(None, None) == "tok-standalone"
