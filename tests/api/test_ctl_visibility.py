"""`segd ctl flow list|watch` and `explain` against a real server; watch's event reading."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from typing import Any

import nacl.signing
import pytest

from segd import crypto
from segd.ctl import visibility
from tests.api.conftest import LiveServer
from tests.api.test_ctl import Ctl, _post, quiet_server_logs

__all__ = ["quiet_server_logs"]

CID = "c0ffee"


@pytest.fixture
def ctl(live_server: LiveServer, capsys: pytest.CaptureFixture[str]) -> Ctl:
    return Ctl(live_server, capsys)


def _agent(server: LiveServer, ctl: Ctl) -> tuple[str, nacl.signing.SigningKey, str]:
    """A host with one db workload (10.0.0.5); (host id, its key, workload id)."""
    ctl.ok("profile", "add", "db", "--labels", "role=db,app=shop")
    token = ctl.ok("key", "issue", "db").strip()
    code = ctl.ok("agent", "activation-code").strip()
    key = nacl.signing.SigningKey.generate()
    pub = crypto.b64e(bytes(key.verify_key))
    reg = _post(
        server.url + "/v1/agent/register",
        {"activation_code": code, "public_key": pub, "hostname": "n1"},
    )
    host = reg["host_id"]
    _signed(
        server,
        host,
        key,
        "/v1/agent/pair",
        {"container_id": CID, "pairing_key": token, "ips": ["10.0.0.5"]},
    )
    [w] = ctl.json("workload", "list")
    return host, key, w["id"]


def _signed(
    server: LiveServer, host: str, key: nacl.signing.SigningKey, path: str, body: Any
) -> Any:
    data = json.dumps(body).encode()
    headers = crypto.sign_request(key, host, "POST", path, data, time.time())
    return _post(server.url + path, body, headers)


def _record(peer: str, port: int, verdict: str, **over: Any) -> dict[str, Any]:
    now = time.time()
    return {
        "container_id": CID,
        "direction": "in",
        "peer_ip": peer,
        "proto": "tcp",
        "port": port,
        "verdict": verdict,
        "connections": 1,
        "first_seen": now - 2,
        "last_seen": now - 1,
        **over,
    }


def test_flow_list(ctl: Ctl, live_server: LiveServer) -> None:
    host, key, wid = _agent(live_server, ctl)
    old = time.time() - 7200
    records = [
        _record("192.0.2.7", 5432, "blocked"),
        _record("192.0.2.8", 22, "potentially_blocked"),
        _record("192.0.2.9", 5432, "blocked", first_seen=old, last_seen=old),
    ]
    _signed(live_server, host, key, "/v1/agent/flows", {"records": records})
    table = ctl.ok("flow", "list", "--verdict", "blocked").splitlines()
    assert len(table) == 3
    row = table[1].split()
    assert row[2:] == [
        *("external", "192.0.2.7", "app=shop,role=db", "(10.0.0.5)", "5432/tcp", "blocked"),
        *("-", "1", "0", host),  # no bytes in this record
    ]
    assert len(ctl.json("flow", "list", "--since", "1h")) == 2
    assert len(ctl.json("flow", "list", "--dst", "role=db", "--port", "22")) == 1
    assert ctl.json("flow", "list", "--src", "role=db") == []
    assert len(ctl.json("flow", "list", "--workload", wid, "--limit", "1")) == 1
    # bad input: one line on stderr, non-zero
    for argv, status in (
        (("flow", "list", "--since", "soon"), 2),
        (("flow", "list", "--src", "colour=red"), 1),
        (("flow", "list", "--verdict", "dropped"), 2),
        (("explain", wid, "192.0.2.1", "99999"), 1),
        (("explain", "nobody", wid, "80"), 1),
        (("workload", "set-mode", wid, "enforce"), 2),
        (("profile", "set-mode", "nope", "full"), 1),
    ):
        code, out, err = ctl.run(*argv)
        assert (code, out) == (status, ""), argv
        assert err.startswith("segd ctl: ") and err.count("\n") == 1, err


class _Stream:
    def __init__(self, lines: list[bytes]) -> None:
        self._lines = lines

    def lines(self, path: str, query: dict[str, str | int] | None = None) -> Iterator[bytes]:
        assert path == "/v1/flows/stream"
        yield from self._lines


def _flow(port: int) -> bytes:
    return json.dumps(
        {
            "id": port,
            "src": {"ip": "192.0.2.1", "kind": "external"},
            "dst": {"ip": "", "kind": "unpaired", "host_id": "h_1", "container_id": "abc"},
            "proto": "tcp",
            "port": port,
            "verdict": "blocked",
            "rule_id": "",
            "connections": 2,
            "packets": 0,
            "bytes": 0,
            "first_seen": 1.0,
            "last_seen": 2.0,
            "reported_by": "h_1",
        }
    ).encode()


def _watch_args(as_json: bool) -> argparse.Namespace:
    return argparse.Namespace(
        json=as_json, src=None, dst=None, verdict=None, workload=None, rule=None, port=None
    )


@pytest.mark.parametrize("as_json", [False, True])
def test_flow_watch_prints_each_flow_and_what_it_missed(
    capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    lines = [
        b": segd flows\n",
        b"\n",
        b"event: flow\n",
        b"data: " + _flow(80) + b"\n",
        b"\n",
        b": keepalive\n",
        b"event: lost\n",
        b'data: {"lost": 4}\n',
        b"event: flow\n",
        b"data: " + _flow(443) + b"\r\n",
    ]
    visibility.flow_watch(_Stream(lines), _watch_args(as_json))  # type: ignore[arg-type]
    out, err = capsys.readouterr()
    rows = out.splitlines()
    if as_json:
        assert [json.loads(r)["port"] for r in rows] == [80, 443]
    else:
        assert rows[0].split()[0] == "LAST_SEEN"
        assert ["80/tcp" in rows[1], "443/tcp" in rows[2]] == [True, True]
        assert "unpaired abc@h_1" in rows[1]
    assert err == "segd ctl: this stream missed 4 flows (reading too slowly)\n"
