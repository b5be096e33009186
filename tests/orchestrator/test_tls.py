"""TLS on both sides: a tcp:// node that requires client certificates, and the
orchestrator's own listener. Certificates are made with the openssl CLI."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from segd.config import ConnectionLimits, OrchestratorConfig, TLSConfig
from segd.orchestrator.app import OrchestratorServer
from tests.orchestrator.conftest import Api, free_port, profile_body
from tests.orchestrator.fake_engine import FakeEngine

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl CLI")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ca",
             "-keyout", "ca-key.pem", "-out", "ca.pem", cwd=d)  # fmt: skip
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "san.cnf"]), ("client", [])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
                 "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *ext, cwd=d)  # fmt: skip
    return d


@pytest.fixture
async def tls_engine(pki: Path) -> AsyncIterator[tuple[FakeEngine, int]]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(pki / "server.pem", pki / "server-key.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    engine = FakeEngine()
    port = free_port()
    await engine.start_tcp(port, ctx)
    try:
        yield engine, port
    finally:
        await engine.stop()


async def test_tls_node_with_client_certificate(
    api: Api, pki: Path, tls_engine: tuple[FakeEngine, int]
) -> None:
    engine, port = tls_engine
    node = {
        "name": "secure",
        "endpoint": f"tcp://127.0.0.1:{port}",
        "tls_cert": str(pki / "client.pem"),
        "tls_key": str(pki / "client-key.pem"),
        "tls_ca": str(pki / "ca.pem"),
    }
    assert (await api.call("POST", "/v1/orch/nodes", node))[0] == 201
    await api.call("POST", "/v1/orch/profiles", profile_body())
    status, [c] = await api.call("POST", "/v1/orch/run", {"profile": "web"})
    assert status == 201 and c["node"] == "secure"
    assert list(engine.containers) == [c["id"]]
    assert (await api.call("DELETE", f"/v1/orch/containers/{c['id']}"))[0] == 200
    assert engine.containers == {}


async def test_tls_node_without_client_certificate_is_unreachable(
    api: Api, pki: Path, tls_engine: tuple[FakeEngine, int]
) -> None:
    engine, port = tls_engine
    node = {"name": "secure", "endpoint": f"tcp://127.0.0.1:{port}", "tls_ca": str(pki / "ca.pem")}
    assert (await api.call("POST", "/v1/orch/nodes", node))[0] == 201
    await api.call("POST", "/v1/orch/profiles", profile_body())
    status, body = await api.call("POST", "/v1/orch/run", {"profile": "web"})
    assert (status, body["error"]) == (503, "node_unreachable")
    assert engine.containers == {}


async def test_plain_client_to_a_tls_node_is_unreachable(
    api: Api, tls_engine: tuple[FakeEngine, int]
) -> None:
    _, port = tls_engine
    node = {"name": "secure", "endpoint": f"tcp://127.0.0.1:{port}"}
    assert (await api.call("POST", "/v1/orch/nodes", node))[0] == 201
    await api.call("POST", "/v1/orch/profiles", profile_body())
    status, body = await api.call("POST", "/v1/orch/run", {"profile": "web"})
    assert (status, body["error"]) == (503, "node_unreachable"), body


async def test_listener_with_tls(pki: Path, tmp_path: Path) -> None:
    port = free_port()
    cfg = OrchestratorConfig(
        listen=f"127.0.0.1:{port}",
        data_dir=str(tmp_path / "orch"),
        register_local_node=False,
        tls=TLSConfig(cert=str(pki / "server.pem"), key=str(pki / "server-key.pem")),
    )
    server = OrchestratorServer(cfg)
    await server.start()
    try:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))

        def health() -> dict[str, str]:
            with urllib.request.urlopen(
                f"https://127.0.0.1:{port}/v1/health", context=ctx, timeout=10
            ) as resp:
                return dict(json.loads(resp.read()))

        assert (await asyncio.to_thread(health))["status"] == "ok"
    finally:
        await server.stop()


async def test_a_tls_handshake_that_never_starts_is_counted_and_cut(
    pki: Path, tmp_path: Path
) -> None:
    """A connection that never sends its ClientHello holds a slot (aiohttp alone
    would keep it a minute): it is counted, the first to go when the listener
    is full, and cut at the header timeout otherwise."""
    port = free_port()
    cfg = OrchestratorConfig(
        listen=f"127.0.0.1:{port}",
        data_dir=str(tmp_path / "orch"),
        register_local_node=False,
        tls=TLSConfig(cert=str(pki / "server.pem"), key=str(pki / "server-key.pem")),
        connections=ConnectionLimits(max_open=16, header_timeout_s=2.0),
    )
    server = OrchestratorServer(cfg)
    await server.start()
    try:
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(16)]
        await asyncio.sleep(0.2)
        silent.append(await asyncio.open_connection("127.0.0.1", port))  # the 17th
        first = silent[0][0]
        assert await asyncio.wait_for(first.read(), 1.0) == b""  # made room at once
        t0 = asyncio.get_running_loop().time()
        for r, _ in silent[1:-1]:
            assert await asyncio.wait_for(r.read(), 10) == b""
        assert asyncio.get_running_loop().time() - t0 < 5
        for _, w in silent:
            w.close()
    finally:
        await server.stop()
