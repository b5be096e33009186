"""`segd ctl` against a real server on a loopback port."""

from __future__ import annotations

import base64
import http.server
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import structlog

from segd import crypto
from segd.ctl import ctl_main
from tests.api.conftest import LiveServer


class Ctl:
    def __init__(self, server: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
        self.server = server
        self.capsys = capsys

    def run(self, *argv: str, conn: bool = True) -> tuple[int, str, str]:
        args = list(argv)
        if conn:
            args = ["--server", self.server.url, "--token-file", str(self.server.token_file), *args]
        code = ctl_main(args)
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *argv: str) -> str:
        code, out, err = self.run(*argv)
        assert (code, err) == (0, ""), err
        return out

    def json(self, *argv: str) -> Any:
        return json.loads(self.ok(*argv, "--json"))


@pytest.fixture(autouse=True)
def quiet_server_logs() -> Iterator[None]:
    """The server runs in this process: keep its logs out of ctl's stdout/stderr."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    yield
    structlog.configure(**saved)


@pytest.fixture
def ctl(live_server: LiveServer, capsys: pytest.CaptureFixture[str]) -> Ctl:
    return Ctl(live_server, capsys)


def _post(url: str, body: Any, headers: dict[str, str] | None = None, method: str = "POST") -> Any:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def _agent_pairs(
    server: LiveServer, code: str, token: str, cid: str, ip: str, sidecar: str = ""
) -> str:
    """Register an agent with `code`, pair one container and report a sidecar of
    it; return the host id."""
    key = nacl.signing.SigningKey.generate()
    reg = _post(
        server.url + "/v1/agent/register",
        {
            "activation_code": code,
            "public_key": crypto.b64e(bytes(key.verify_key)),
            "hostname": "node1",
        },
    )
    body = {"container_id": cid, "pairing_key": token, "ips": [ip]}
    data = json.dumps(body).encode()
    headers = crypto.sign_request(key, reg["host_id"], "POST", "/v1/agent/pair", data, time.time())
    _post(server.url + "/v1/agent/pair", body, headers)
    if sidecar:
        path = "/v1/agent/sidecars"
        sidecars = {"sidecars": [{"container_id": sidecar, "shares": cid, "name": "proxy"}]}
        data = json.dumps(sidecars).encode()
        headers = crypto.sign_request(key, reg["host_id"], "PUT", path, data, time.time())
        _post(server.url + path, sidecars, headers, method="PUT")
    return str(reg["host_id"])


def test_every_verb(ctl: Ctl, live_server: LiveServer) -> None:
    # rules
    rid = ctl.ok(
        "rule",
        "add",
        "--provider",
        "role=db,app=shop",
        "--consumer",
        "role=web",
        "--consumer",
        "role=api",
        "--service",
        "tcp/5432",
        "--service",
        "icmp",
        "--option",
        "log",
        "--description",
        "web to db",
    ).strip()
    assert rid.startswith("r_")
    any_rule = ctl.json(
        "rule", "add", "--provider", "any", "--consumer", "any", "--service", "udp/53"
    )
    table = ctl.ok("rule", "list")
    assert table.splitlines()[0].split() == [
        "ID",
        "PROVIDERS",
        "CONSUMERS",
        "SERVICES",
        "OPTIONS",
        "DESCRIPTION",
    ]
    assert "app=shop,role=db" in table and "role=web | role=api" in table
    assert [r["id"] for r in ctl.json("rule", "list")] == [rid, any_rule["id"]]
    assert "removed" in ctl.ok("rule", "rm", any_rule["id"])
    # profiles
    assert (
        ctl.ok(
            "profile",
            "add",
            "db",
            "--labels",
            "role=db,app=shop",
            "--lock",
            "role,app",
            "--max-uses",
            "3",
            "--lifespan",
            "2h",
            "--on-mismatch",
            "default",
            "--description",
            "databases",
        ).strip()
        == "db"
    )
    ctl.ok("profile", "add", "off", "--labels", "role=x", "--disabled")
    [db, off] = ctl.json("profile", "list")
    assert (db["locked"], db["max_uses"], db["lifespan_s"], db["on_mismatch"]) == (
        ["app", "role"],
        3,
        7200,
        "default",
    )
    assert off["enabled"] is False
    assert "2h" in ctl.ok("profile", "list")
    # keys
    token = ctl.ok("key", "issue", "db", "--lifespan", "30m", "--description", "ci").strip()
    assert token.startswith("segd1.") and "\n" not in token
    other = ctl.json("key", "issue", "db", "--max-uses", "1")
    keys = ctl.json("key", "list", "db")
    assert [k["key_id"] for k in keys] == [keys[0]["key_id"], other["key_id"]]
    assert keys[0]["expires_at"] - keys[0]["issued_at"] == pytest.approx(1800, abs=1)
    assert "active" in ctl.ok("key", "list")
    assert "revoked" in ctl.ok("key", "revoke", other["key_id"])
    assert "revoked" in ctl.ok("key", "list", "db")
    # agents, workloads, hosts
    code = ctl.ok("agent", "activation-code", "--lifespan", "10m").strip()
    host_id = _agent_pairs(live_server, code, token, "c0ffee", "10.0.0.5", sidecar="5eaf00d")
    [w] = ctl.json("workload", "list")
    assert (w["host_id"], w["labels"]) == (host_id, {"app": "shop", "role": "db"})
    assert w["sidecars"] == [{"container_id": "5eaf00d", "name": "proxy"}]
    header, main, side = ctl.ok("workload", "list").splitlines()
    assert header.split() == [
        *("ID", "HOST", "CONTAINER", "NAME", "LABELS", "IPS", "PAIRED", "MODE", "SHARES")
    ]
    assert "10.0.0.5" in main and main.split()[-2:] == ["full", "-"]
    assert side.split() == ["-", host_id, "5eaf00d", "proxy", "-", "-", "-", "-", w["id"]]
    # modes
    assert "mode visibility, visibility enhanced" in ctl.ok(
        "profile", "set-mode", "db", "visibility", "--visibility", "enhanced"
    )
    assert ctl.json("profile", "set-mode", "db", "full")["visibility"] == "enhanced"
    assert "mode idle (its own)" in ctl.ok("workload", "set-mode", w["id"], "idle")
    assert ctl.ok("workload", "list").splitlines()[1].split()[-2] == "idle"
    assert ctl.json("workload", "set-mode", w["id"], "inherit")["mode"] == "full"
    # explain (db to an address outside segd)
    said = ctl.ok("explain", w["id"], "192.0.2.1", "443")
    assert said.startswith("app=shop,role=db (10.0.0.5) -> external 192.0.2.1 443/tcp: blocked")
    assert ctl.json("explain", "10.0.0.5", "192.0.2.1", "53/udp")["reason"] == "no_rule"
    # flows
    assert ctl.json("flow", "list") == []
    assert ctl.ok("flow", "list").split() == [
        *("LAST_SEEN", "SRC", "DST", "PORT", "VERDICT", "RULE", "CONNS", "BYTES", "REPORTED_BY")
    ]
    assert host_id in ctl.ok("host", "list")
    assert [h["workloads"] for h in ctl.json("host", "list")] == [1]
    assert "revoked" in ctl.ok("host", "revoke", host_id)
    assert ctl.json("host", "list")[0]["revoked"] is True
    # profile revoke and rm
    assert "all 2 keys are revoked" in ctl.ok("profile", "revoke", "db")
    assert "removed" in ctl.ok("profile", "rm", "off")
    # audit
    entries = ctl.json("audit", "list", "--limit", "200")
    assert {"rule.added", "key.issued", "workload.paired", "host.revoked"} <= {
        e["event"] for e in entries
    }
    assert len(ctl.json("audit", "list", "--limit", "2")) == 2
    assert "workload.paired" in ctl.ok("audit", "list")


def test_unlimited_keys_unpair_and_revoke_with_unpair(ctl: Ctl, live_server: LiveServer) -> None:
    ctl.ok("profile", "add", "web", "--labels", "role=web")  # unlimited by default
    ctl.ok("profile", "add", "db", "--labels", "role=db", "--max-uses", "unlimited")
    ctl.ok("profile", "add", "api", "--labels", "role=api", "--max-uses", "2")
    assert [p["max_uses"] for p in ctl.json("profile", "list")] == [2, None, None]
    assert "∞" in ctl.ok("profile", "list")
    web = ctl.ok("key", "issue", "web").strip()
    db = ctl.ok("key", "issue", "db").strip()
    api = ctl.json("key", "issue", "api", "--max-uses", "unlimited")
    assert api["max_uses"] is None
    activation = ctl.ok("agent", "activation-code").strip()
    _agent_pairs(live_server, activation, web, "c-web", "10.0.0.5")
    listed = {row.split()[1]: row.split()[2] for row in ctl.ok("key", "list").splitlines()[1:]}
    assert listed == {"web": "1/∞", "db": "0/∞", "api": "0/∞"}
    # workload unpair
    [w] = ctl.json("workload", "list")
    assert "unpaired" in ctl.ok("workload", "unpair", w["id"])
    assert ctl.json("workload", "list") == []
    code, out, err = ctl.run("workload", "unpair", w["id"])
    assert (code, out) == (1, "") and "no workload" in err and err.count("\n") == 1
    # key revoke --unpair, profile revoke --unpair
    for token, cid, ip in ((db, "c-db", "10.0.0.6"), (db, "c-db2", "10.0.0.7")):
        _agent_pairs(live_server, ctl.ok("agent", "activation-code").strip(), token, cid, ip)
    db_key = next(k["key_id"] for k in ctl.json("key", "list", "db"))
    assert "unpaired" in ctl.ok("key", "revoke", db_key, "--unpair")
    assert ctl.json("workload", "list") == []
    _agent_pairs(live_server, ctl.ok("agent", "activation-code").strip(), web, "c-w2", "10.0.0.8")
    assert "unpaired" in ctl.ok("profile", "revoke", "web", "--unpair")
    assert ctl.json("workload", "list") == []
    events = [(e["event"], e["reason"]) for e in ctl.json("audit", "list", "--limit", "200")]
    assert {
        ("workload.unpaired", "unpaired_by_admin"),
        ("workload.unpaired", "key_revoked"),
        ("workload.unpaired", "profile_revoked"),
    } <= set(events)


def test_server_and_token_from_env_and_the_local_data_dir(
    ctl: Ctl, live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEGD_SERVER", live_server.url)
    monkeypatch.setenv("SEGD_TOKEN", live_server.token)
    assert ctl.run("rule", "list", conn=False)[0] == 0
    monkeypatch.delenv("SEGD_TOKEN")
    # no token anywhere else: the allinone data dir's token file is used
    monkeypatch.setenv("SEGD_DATA_DIR", str(Path(live_server.cfg.data_dir).parent))
    assert ctl.run("profile", "list", "--json", conn=False)[:2] == (0, "[]\n")
    monkeypatch.setenv("SEGD_DATA_DIR", "/nonexistent")
    code, out, err = ctl.run("rule", "list", conn=False)
    assert code == 1 and out == ""
    assert err.startswith("segd ctl: ") and "admin token" in err and err.count("\n") == 1


def test_options_work_after_the_verb_too(ctl: Ctl, live_server: LiveServer) -> None:
    code, out, _ = ctl.run(
        "rule",
        "list",
        "--json",
        "--server",
        live_server.url,
        "--token-file",
        str(live_server.token_file),
        conn=False,
    )
    assert (code, out) == (0, "[]\n")


@pytest.mark.parametrize(
    ("argv", "status", "needle"),
    [
        (["rule", "rm", "r_000000000000"], 1, "no rule"),
        (["profile", "add", "x", "--labels", "colour=red"], 1, "unknown label dimension"),
        (
            ["rule", "add", "--provider", "any", "--consumer", "any", "--service", "tcp/99999"],
            1,
            "invalid port range",
        ),
        (["key", "issue", "nope"], 1, "no profile"),
        (["key", "issue", "db", "--lifespan", "soon"], 2, "invalid lifespan"),
        (["key", "issue", "db", "--max-uses", "lots"], 2, "invalid --max-uses"),
        (["key", "issue", "db", "--max-uses", "0"], 2, "invalid --max-uses"),
        (["profile", "add", "x", "--labels", "role=x", "--max-uses", "-1"], 2, "--max-uses"),
        (["workload", "unpair"], 2, "required"),
        (["profile", "add", "x", "--labels", "role"], 2, "expected dimension=value"),
        (["rule", "add", "--provider", "any"], 2, "required"),
        (["rule"], 2, "required"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_errors_are_one_line_on_stderr(ctl: Ctl, argv: list[str], status: int, needle: str) -> None:
    code, out, err = ctl.run(*argv)
    assert code == status
    assert out == ""
    assert err.startswith("segd ctl") and err.count("\n") == 1 and needle in err, err


def test_bad_token_and_unreachable_server(ctl: Ctl, tmp_path: Path) -> None:
    bad = tmp_path / "bad.token"
    bad.write_text("segd_nope\n")
    code, _, err = ctl.run(
        "--server", ctl.server.url, "--token-file", str(bad), "rule", "list", conn=False
    )
    assert code == 1 and err == "segd ctl: invalid admin token\n"
    code, _, err = ctl.run(
        "--server", "http://127.0.0.1:1", "--token-file", str(bad), "rule", "list", conn=False
    )
    assert code == 1 and err.startswith("segd ctl: cannot reach segd server at http://127.0.0.1:1")


def test_orch_is_handed_to_the_orchestrator_client(ctl: Ctl, tmp_path: Path) -> None:
    token = tmp_path / "orch.token"
    token.write_text("t\n")
    code, out, err = ctl.run(
        "--server", "http://127.0.0.1:1", "--token-file", str(token), "orch", "ps", conn=False
    )
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "127.0.0.1:1" in err and "orch" in err
    assert ctl.run("orch", "--help", conn=False)[0] == 0


def test_help_exits_zero(ctl: Ctl) -> None:
    code, out, _ = ctl.run("--help", conn=False)
    assert code == 0 and "rule" in out and "activation" not in out.splitlines()[0]


def test_admin_rotate_token_writes_the_file_it_read(
    ctl: Ctl, live_server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server's own admin.token (the allinone data dir): the server rewrites it.
    monkeypatch.setenv("SEGD_SERVER", live_server.url)
    monkeypatch.delenv("SEGD_TOKEN", raising=False)
    monkeypatch.setenv("SEGD_DATA_DIR", str(Path(live_server.cfg.data_dir).parent))
    first = live_server.token
    code, out, err = ctl.run("admin", "rotate-token", conn=False)
    assert (code, err) == (0, "")
    assert out == (
        f"admin token rotated: the new one is in {live_server.token_file}; "
        "every other token is refused\n"
    )
    second = live_server.token
    assert second != first
    assert ctl.run("rule", "list", conn=False)[0] == 0
    # A copy elsewhere (a remote admin's --token-file): written there too, 0600.
    copy = tmp_path / "my.token"
    copy.write_text(second + "\n")
    code, out, err = ctl.run("--token-file", str(copy), "admin", "rotate-token", conn=False)
    assert (code, err) == (0, "") and str(copy) in out
    third = copy.read_text().strip()
    assert third == live_server.token and third not in (first, second)
    assert copy.stat().st_mode & 0o777 == 0o600
    # From the environment: the new token is printed alone.
    monkeypatch.setenv("SEGD_TOKEN", third)
    code, out, err = ctl.run("admin", "rotate-token", conn=False)
    assert (code, err) == (0, "") and out.strip() == live_server.token
    for old in (first, second, third):
        monkeypatch.setenv("SEGD_TOKEN", old)
        code, _, err = ctl.run("rule", "list", conn=False)
        assert (code, err) == (1, "segd ctl: invalid admin token\n")


# What one host may have written before the API refused it, as `segd ctl` receives it.
HOSTILE = "web\u202egnp.exe \x1b]0;owned\x07 \x9b2J \x7f \u2066x\u2069 line\nbreak"
HOSTILE_ANSWERS: dict[str, Any] = {
    "/v1/audit": [
        {
            "id": 1,
            "at": 0,
            "event": "tamper",
            "result": "ok",
            "reason": "",
            "host_id": "h_0123456789ab",
            "detail": HOSTILE,
        }
    ],
    "/v1/workloads": [
        {
            "id": "w_0123456789ab",
            "host_id": "h_0123456789ab",
            "container_id": "c1",
            "name": HOSTILE,
            "labels": {"role": "web"},
            "ips": ["10.0.0.1"],
            "key_id": "k_0123456789ab",
            "paired_at": 0,
        }
    ],
}


@pytest.fixture
def hostile_server() -> Iterator[str]:
    """A stand-in server whose listings hold control and bidi characters."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(HOSTILE_ANSWERS[self.path.split("?")[0]]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("listing", ["audit", "workload"])
def test_agent_text_with_control_and_bidi_characters_is_escaped_in_ctl_tables(
    hostile_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], listing: str
) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    code = ctl_main(["--server", hostile_server, "--token-file", str(token), listing, "list"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert all(line.isprintable() for line in out.splitlines()), out
    assert out.count("\n") == 2  # header and one row: the newline in the text is escaped
    assert "\\u202e" in out and "\\x1b" in out and "\\x9b" in out and "\\x7f" in out


def _agent_joins(server: LiveServer, code: str, wg_key: str) -> str:
    """Register an agent with `code` and join the mesh; return the host id."""
    key = nacl.signing.SigningKey.generate()
    reg = _post(
        server.url + "/v1/agent/register",
        {
            "activation_code": code,
            "public_key": crypto.b64e(bytes(key.verify_key)),
            "hostname": "n",
        },
    )
    body = {"public_key": wg_key, "endpoint": "192.0.2.7:51820"}
    data = json.dumps(body).encode()
    headers = crypto.sign_request(key, reg["host_id"], "PUT", "/v1/agent/mesh", data, time.time())
    assert _post(server.url + "/v1/agent/mesh", body, headers, method="PUT")["subnet"]
    return str(reg["host_id"])


def test_fleet_verbs_ip_peers_encrypted_and_the_mesh_columns(
    ctl: Ctl, live_server: LiveServer
) -> None:
    rid = ctl.ok(
        "rule", "add", "--provider", "role=db", "--consumer", "ip:203.0.113.0/24",
        "--consumer", "role=web", "--consumer", "ip:2001:db8::/32", "--service", "tcp/5432",
    ).strip()  # fmt: skip
    only_ips = ctl.json(
        "rule", "add", "--provider", "ip:198.51.100.7", "--consumer", "role=web",
        "--service", "tcp/443",
    )  # fmt: skip
    assert (only_ips["providers"], only_ips["provider_ips"]) == ([], ["198.51.100.7/32"])
    enc = ctl.json(
        "rule", "add", "--provider", "role=db", "--consumer", "role=web", "--service", "tcp/1",
        "--option", "encrypted",
    )  # fmt: skip
    assert enc["options"] == ["encrypted"]
    [mixed, _, _] = ctl.json("rule", "list")
    assert (mixed["id"], mixed["consumers"], mixed["consumer_ips"]) == (
        rid,
        [{"role": "web"}],
        ["203.0.113.0/24", "2001:db8::/32"],
    )
    table = ctl.ok("rule", "list")
    assert "role=web | ip:203.0.113.0/24 | ip:2001:db8::/32" in table
    assert "ip:198.51.100.7/32" in table and "encrypted" in table
    before = ctl.json("rule", "list")
    for argv, needle in [
        (("--consumer", "ip:10.0.0.1/8"), "host bits set"),
        (("--consumer", "ip:nope"), "invalid address block"),
        (("--consumer", "ip:"), "ip: needs an address block"),
        (("--consumer", "any", "--consumer", "ip:10.0.0.0/8"), "'any' cannot be combined"),
        (("--consumer", "ip:10.0.0.0/8", "--option", "encrypted"), "encrypted rule cannot"),
        (("--consumer", "any", "--option", "encrypted"), "encrypted rule cannot"),
    ]:
        code, out, err = ctl.run(
            "rule", "add", "--provider", "role=db", *argv, "--service", "tcp/1"
        )  # fmt: skip
        assert code != 0 and out == "" and err.count("\n") == 1 and needle in err, (argv, err)
    assert ctl.json("rule", "list") == before
    # hosts: mesh state, subnet, endpoint and the WireGuard key (short; whole in --json)
    wg_key = base64.b64encode(b"w" * 32).decode()
    host_id = _agent_joins(live_server, ctl.ok("agent", "activation-code").strip(), wg_key)
    header, row = ctl.ok("host", "list").splitlines()
    assert header.split()[-4:] == ["MESH", "SUBNET", "ENDPOINT", "WG_KEY"]
    assert row.split()[-4:] == ["up", "10.200.0.0/24", "192.0.2.7:51820", wg_key[:8] + "…"]
    [h] = ctl.json("host", "list")
    assert (h["id"], h["mesh"], h["subnet"], h["endpoint"], h["mesh_public_key"]) == (
        host_id,
        "up",
        "10.200.0.0/24",
        "192.0.2.7:51820",
        wg_key,
    )
