"""Serving for real: TLS, draining on stop, SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from segd import crypto
from segd.config import TLSConfig
from segd.ctl import ctl_main
from tests.api.conftest import LiveServer, start_live_server


def _post(server: LiveServer, path: str, body: Any, headers: dict[str, str]) -> Any:
    req = urllib.request.Request(
        server.url + path, data=json.dumps(body).encode(), method="POST", headers=headers
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _register(server: LiveServer) -> tuple[str, nacl.signing.SigningKey]:
    admin = {"Authorization": f"Bearer {server.token}"}
    code = _post(server, "/v1/activation-codes", {}, admin)["code"]
    key = nacl.signing.SigningKey.generate()
    pk = crypto.b64e(bytes(key.verify_key))
    reg = _post(
        server,
        "/v1/agent/register",
        {"activation_code": code, "public_key": pk, "hostname": "n1"},
        {},
    )
    return str(reg["host_id"]), key


def test_stop_releases_long_polls_and_drains(tmp_path: Path) -> None:
    server = start_live_server(tmp_path / "server", longpoll_timeout_s=60.0)
    try:
        host_id, key = _register(server)
        path = "/v1/agent/instructions?since=1&wait=60"
        headers = crypto.sign_request(key, host_id, "GET", path, b"", time.time())
        got: list[int] = []

        def poll() -> None:
            req = urllib.request.Request(server.url + path, headers=headers)
            with urllib.request.urlopen(req, timeout=30) as r:
                got.append(r.status)

        t = threading.Thread(target=poll)
        t.start()
        time.sleep(0.3)
        assert t.is_alive()  # parked
    finally:
        started = time.monotonic()
        server.stop()
    t.join(5)
    assert got == [204]
    assert time.monotonic() - started < 3


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_listener_and_ctl_over_https(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=segd",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    server = start_live_server(tmp_path / "server", tls=TLSConfig(cert=str(cert), key=str(key)))
    try:
        assert server.url.startswith("https://127.0.0.1:")
        conn = ["--server", server.url, "--token-file", str(server.token_file)]
        capsys.readouterr()
        assert ctl_main([*conn, "--ca-file", str(cert), "rule", "list", "--json"]) == 0
        assert capsys.readouterr().out == "[]\n"
        assert ctl_main([*conn, "rule", "list"]) == 1  # the self-signed cert is not trusted
        err = capsys.readouterr().err
        assert err.startswith("segd ctl: ") and "CERTIFICATE_VERIFY_FAILED" in err
    finally:
        server.stop()


def test_sigterm_stops_the_server_process(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "segd",
            "server",
            "--data-dir",
            str(tmp_path / "s"),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env={**os.environ},
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "server did not come up"
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert (tmp_path / "s" / "admin.token").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
