"""systemd readiness notifications reach $NOTIFY_SOCKET (plain and abstract)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from segd import sdnotify


def test_notify_path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1")
        assert s.recv(64) == b"READY=1"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0segd-test-notify")
        monkeypatch.setenv("NOTIFY_SOCKET", "@segd-test-notify")
        assert sdnotify.notify("STOPPING=1")
        assert s.recv(64) == b"STOPPING=1"


def test_not_under_systemd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not sdnotify.notify("READY=1")
