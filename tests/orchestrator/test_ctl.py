"""`segd ctl orch` against a real orchestrator on a free loopback port (run in a
background event loop, with a fake Docker engine as its node)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from segd.config import OrchestratorConfig
from segd.ctl.orch import orch_main
from tests.orchestrator.background import Background
from tests.orchestrator.conftest import (
    KEY,
    KEY2,
    containers_of,
    docker,
    free_port,
    labels_for,
    pairing_key,
    soon,
    wait_past,
)
from tests.orchestrator.fake_engine import FakeEngine

MASKED = KEY[:10] + "…(masked)"
ADD = ["profile", "add", "w", "--image", "i", "--key", "k"]


class Ctl:
    def __init__(self, url: str, token_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.url = url
        self.token_file = token_file
        self._capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self._capsys.readouterr()
        code = orch_main(["--server", self.url, "--token-file", str(self.token_file), *argv])
        out, err = self._capsys.readouterr()
        return code, out, err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert (code, err) == (0, ""), (argv, code, err)
        return out

    def fails(self, *argv: str, code: int = 1) -> str:
        got, out, err = self(*argv)
        assert got == code, (argv, got, out, err)
        assert out == ""
        assert err.count("\n") == 1 and err.startswith("segd ctl orch: "), err
        assert "Traceback" not in err
        return err.strip()


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """The orchestrator's log events (kept off the captured stdout)."""
    with structlog.testing.capture_logs() as events:
        yield events
    assert KEY not in repr(events) and KEY2 not in repr(events)


@pytest.fixture
def bg(logs: list[MutableMapping[str, Any]], sock_dir: Path) -> Iterator[Background]:
    b = Background()
    try:
        b.start_engine(str(sock_dir / "docker.sock"))
        yield b
    finally:
        b.close()


@pytest.fixture
def engine(bg: Background) -> FakeEngine:  # the thread-hosted one, not conftest's
    assert bg.engine is not None
    return bg.engine


@pytest.fixture
def ctl(bg: Background, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Ctl:
    cfg = OrchestratorConfig(
        listen=f"127.0.0.1:{free_port()}",
        data_dir=str(tmp_path / "orch"),
        register_local_node=False,
    )
    url = bg.start_orchestrator(cfg)
    c = Ctl(url, bg.token_file, capsys)
    assert bg.engine is not None
    c.ok("node", "add", "fake", "--endpoint", "unix://" + bg.engine.socket)
    return c


def _rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.strip().splitlines()]


def test_profiles(ctl: Ctl) -> None:
    out = ctl.ok(
        "profile", "add", "web",
        "--image", "segd-busybox:latest",
        "--cmd", "sh -c 'exec sleep 100000'",
        "--env", "A=1", "--env", "B=x=y",
        "--labels", "role=web,app=shop",
        "--key", KEY,
        "--description", "the web tier",
    )  # fmt: skip
    assert out == f"added container profile web (key {MASKED})\n"
    table = ctl.ok("profile", "list")
    assert KEY not in table
    header, row = table.strip().splitlines()
    assert header.split()[:4] == ["NAME", "IMAGE", "COMMAND", "LABELS"]
    assert row.startswith("web  ") and "sh -c 'exec sleep 100000'" in row
    assert "app=shop,role=web" in row and MASKED in row and "the web tier" in row
    [p] = json.loads(ctl.ok("profile", "list", "--json"))
    assert p["env"] == {"A": "1", "B": "x=y"}
    assert p["command"] == ["sh", "-c", "exec sleep 100000"]
    assert p["pairing_key"] == MASKED
    assert ctl.ok("profile", "rm", "web") == "removed container profile web\n"
    assert json.loads(ctl.ok("profile", "list", "--json")) == []


def test_profile_key_from_stdin(ctl: Ctl, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(KEY + "\n"))
    ctl.ok("profile", "add", "web", "--image", "segd-busybox:latest", "--key", "-")
    assert json.loads(ctl.ok("profile", "list", "--json"))[0]["pairing_key"] == MASKED


def test_nodes(ctl: Ctl) -> None:
    assert ctl.ok("node", "add", "edge", "--endpoint", "tcp://10.0.0.5:2375") == (
        "added node edge (tcp://10.0.0.5:2375)\n"
    )
    rows = _rows(ctl.ok("node", "list"))
    assert rows[0] == ["NAME", "ENDPOINT", "TLS"]
    assert rows[1] == ["edge", "tcp://10.0.0.5:2375", "no"]
    assert rows[2][0] == "fake"
    names = [n["name"] for n in json.loads(ctl.ok("node", "list", "--json"))]
    assert names == ["edge", "fake"]
    ctl.ok("node", "rm", "edge")
    err = ctl.fails("node", "rm", "edge")
    assert err == "segd ctl orch: no node 'edge'"


def test_run_ps_change_rm(ctl: Ctl, engine: FakeEngine) -> None:
    ctl.ok("profile", "add", "web", "--image", "segd-busybox:latest", "--key", KEY,
           "--labels", "role=web,app=shop")  # fmt: skip
    ctl.ok("profile", "add", "api", "--image", "segd-busybox:latest", "--key", KEY2,
           "--labels", "role=api,app=shop")  # fmt: skip
    rows = _rows(ctl.ok("run", "web", "--count", "2", "--node", "fake"))
    assert rows[0] == ["ID", "NAME", "NODE", "PROFILE", "STATE", "LABELS", "KEY", "CREATED"]
    assert len(rows) == 3 and all(
        r[2:6] == ["fake", "web", "running", "app=shop,role=web"] for r in rows[1:]
    )
    assert len(engine.running()) == 2

    listed = json.loads(ctl.ok("ps", "--json"))
    assert len(listed) == 2 and KEY not in json.dumps(listed)
    table = ctl.ok("ps")
    assert KEY not in table and MASKED in table
    assert len(_rows(ctl.ok("ps", "--node", "fake"))) == 3

    first = listed[0]["id"]
    out = ctl.ok("change", first[:12], "api")
    assert out.startswith(f"replaced {first[:12]} with:\n")
    assert "api" in out and first not in engine.containers
    changed = json.loads(ctl.ok("change", listed[1]["name"], "api", "--json"))
    assert changed["old"] == listed[1]["id"] and changed["new"]["profile"] == "api"
    assert {c.labels["segd.pairing-key"] for c in engine.containers.values()} == {KEY2}

    for c in json.loads(ctl.ok("ps", "--json")):
        assert ctl.ok("rm", c["id"][:12]).startswith(f"removed {c['id'][:12]} ")
    assert engine.containers == {}
    assert _rows(ctl.ok("ps")) == [
        ["ID", "NAME", "NODE", "PROFILE", "STATE", "LABELS", "KEY", "CREATED"]
    ]


def test_run_with_an_expired_key_left_containers_isolated(
    ctl: Ctl, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`orch run PROFILE --count K` with a key that expired: one line, exit 1,
    nothing started; a new key set on the profile runs again."""
    exp = soon()
    ctl.ok("profile", "add", "web", "--image", "segd-busybox:latest", "--key", pairing_key(exp))
    wait_past(exp)
    err = ctl.fails("run", "web", "--count", "3")
    assert err.startswith("segd ctl orch: container profile 'web': its pairing key expired at ")
    assert "segd ctl orch profile set-key web --key -" in err
    assert engine.containers == {}
    fresh = pairing_key(time.time() + 3600)
    monkeypatch.setattr("sys.stdin", io.StringIO(fresh + "\n"))
    out = ctl.ok("profile", "set-key", "web", "--key", "-")
    assert out == f"container profile web now starts containers with key {fresh[:10]}…(masked)\n"
    assert len(_rows(ctl.ok("run", "web", "--count", "3"))) == 4
    assert {c.labels["segd.pairing-key"] for c in engine.containers.values()} == {fresh}
    assert ctl.fails("profile", "set-key", "nope", "--key", fresh) == (
        "segd ctl orch: no container profile 'nope'"
    )


def test_api_errors_are_one_line(ctl: Ctl, engine: FakeEngine) -> None:
    assert ctl.fails("run", "nope") == "segd ctl orch: no container profile 'nope'"
    err = ctl.fails("profile", "add", "x", "--image", "i", "--key", KEY, "--labels", "colour=red")
    assert "unknown label dimension 'colour'" in err and KEY not in err
    ctl.ok("profile", "add", "ghost", "--image", "ghost:1", "--key", KEY)
    err = ctl.fails("run", "ghost")
    assert err.startswith("segd ctl orch: image not found on node 'fake'")
    ctl.ok("node", "add", "down", "--endpoint", "tcp://127.0.0.1:1")
    err = ctl.fails("run", "ghost", "--node", "down")
    assert err == (
        "segd ctl orch: node 'down' is unreachable at tcp://127.0.0.1:1: connection refused"
    )
    assert ctl.fails("rm", "abcdef") == (
        "segd ctl orch: no container 'abcdef' started by this orchestrator"
    )
    assert engine.containers == {}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "the following arguments are required"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["profile"], "profile: the following arguments are required: VERB"),
        (["profile", "add", "web"], "the following arguments are required: --image, --key"),
        (["run", "web", "--count", "two"], "invalid int value: 'two'"),
        ([*ADD, "--labels", "role"], "expected dimension=value"),
        ([*ADD, "--env", "A"], "expected NAME=VALUE"),
        ([*ADD, "--cmd", "sh -c 'x"], "--cmd:"),
        (["ps", "--jsn"], "unrecognized arguments: --jsn"),
    ],
)  # fmt: skip
def test_usage_errors_exit_2(ctl: Ctl, argv: list[str], needle: str) -> None:
    assert needle in ctl.fails(*argv, code=2)


def test_help_exits_0(ctl: Ctl) -> None:
    code, out, _ = ctl("--help")
    assert code == 0 and "segd ctl orch" in out


def test_unreachable_orchestrator_and_bad_tokens(
    ctl: Ctl, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    down = Ctl(f"http://127.0.0.1:{free_port()}", ctl.token_file, capsys)
    err = down.fails("ps")
    assert err.startswith("segd ctl orch: cannot reach the orchestrator at http://127.0.0.1:")
    assert err.endswith("Connection refused")
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token\n")
    assert (
        Ctl(ctl.url, wrong, capsys).fails("ps") == "segd ctl orch: missing or invalid admin token"
    )
    missing = Ctl(ctl.url, tmp_path / "none.token", capsys).fails("ps")
    assert missing.startswith("segd ctl orch: cannot read admin token") and "none.token" in missing
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    assert "is empty" in Ctl(ctl.url, empty, capsys).fails("ps")
    assert "invalid orchestrator URL" in Ctl("ftp://x", wrong, capsys).fails("ps", code=2)


def test_resolution_order(
    ctl: Ctl, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    token = ctl.token_file.read_text().strip()
    dead = f"http://127.0.0.1:{free_port()}"

    def run(argv: list[str], **kw: str | None) -> int:
        capsys.readouterr()
        return orch_main(argv, server=kw.get("server"), token=kw.get("token"))

    # Environment only.
    monkeypatch.setenv("SEGD_ORCH_SERVER", ctl.url)
    monkeypatch.setenv("SEGD_ORCH_TOKEN", token)
    assert run(["node", "list"]) == 0
    # What `segd ctl` passes beats the environment.
    assert run(["node", "list"], server=dead) == 1
    assert run(["node", "list"], token="wrong") == 1
    # Flags beat what `segd ctl` passes.
    assert run(["--server", ctl.url, "node", "list"], server=dead) == 0
    assert run(["--token-file", str(ctl.token_file), "node", "list"], token="wrong") == 0
    # Nothing set: the default token file (which does not exist here).
    monkeypatch.delenv("SEGD_ORCH_TOKEN")
    monkeypatch.setenv("SEGD_DATA_DIR", "/nonexistent")
    assert run(["node", "list"]) == 1
    assert "/var/lib/segd/orchestrator/admin.token" in capsys.readouterr().err


@pytest.mark.docker
def test_ctl_on_the_real_engine(
    run_id: str,
    logs: list[MutableMapping[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    b = Background()
    try:
        cfg = OrchestratorConfig(
            listen=f"127.0.0.1:{free_port()}",
            data_dir=str(tmp_path / "orch"),
            container_labels=labels_for(run_id),
        )
        ctl = Ctl(b.start_orchestrator(cfg), b.token_file, capsys)
        ctl.ok("profile", "add", "web", "--image", "segd-busybox:latest", "--key", KEY,
               "--cmd", "sh -c 'exec sleep 100000'", "--labels", "role=web,app=shop")  # fmt: skip
        ctl.ok("profile", "add", "api", "--image", "segd-busybox:latest", "--key", KEY2,
               "--cmd", "sh -c 'exec sleep 100000'", "--labels", "role=api")  # fmt: skip
        started = json.loads(ctl.ok("run", "web", "--count", "2", "--json"))
        assert sorted(containers_of(run_id)) == sorted(c["id"] for c in started)
        rows = _rows(ctl.ok("ps"))[1:]
        assert {r[2] for r in rows} == {"local"} and {r[4] for r in rows} == {"running"}
        changed = json.loads(ctl.ok("change", started[0]["name"], "api", "--json"))
        assert sorted(containers_of(run_id)) == sorted([changed["new"]["id"], started[1]["id"]])
        labels = json.loads(docker("inspect", changed["new"]["id"]))[0]["Config"]["Labels"]
        assert labels["segd.pairing-key"] == KEY2 and labels["segd.label.role"] == "api"
        ctl.ok("rm", changed["new"]["id"][:12])
        ctl.ok("rm", started[1]["id"])
        assert containers_of(run_id) == []
        err = ctl.fails("run", "nope")
        assert err == "segd ctl orch: no container profile 'nope'"
    finally:
        b.close()
