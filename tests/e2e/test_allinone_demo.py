"""`segd allinone` with no config, and `segd demo` end to end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.stack import Proc, docker, free_port, wait_for
from tests.e2e.stack import Stack as _Stack

pytestmark = pytest.mark.docker


def test_allinone_pairs_plain_docker_run_and_enforces(docker_host: str, tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "aio"
    proc = Proc(
        "allinone",
        [
            sys.executable,
            "-m",
            "segd",
            "allinone",
            "--data-dir",
            str(data),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        tmp_path / "aio.log",
        dict(os.environ),
    )
    proc.start()
    s = _Stack(tmp_path, port=port)
    try:
        wait_for(lambda: (data / "server" / "admin.token").exists(), 20, "admin token")
        s.token = (data / "server" / "admin.token").read_text().strip()
        wait_for(lambda: proc.count("allinone.ready") > 0, 30, "allinone ready")
        s.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
        # Plain `docker run --label segd.pairing-key=...`: the agent does not care who started it.
        web = s.run("web", key=s.key({"role": "web"}))
        db = s.run("db", key=s.key({"role": "db"}))
        other = s.run("other")
        wait_for(lambda: {web, db} <= {w["container_id"] for w in s.workloads()}, 20, "pairing")
        db_ip, other_ip = s.ip(db), s.ip(other)
        wait_for(lambda: s.probe_many(web, [(db_ip, 5432)])[(db_ip, 5432)], 10, "web -> db")
        got = s.probe_many(web, [(db_ip, 80), (other_ip, 80)])
        assert got == {(db_ip, 80): False, (other_ip, 80): False}
        assert s.probe_many(other, [(db_ip, 5432)]) == {(db_ip, 5432): False}
        for sub in ("server/admin.token", "server/server.key", "agent/agent.key"):
            assert (data / sub).stat().st_mode & 0o777 == 0o600, sub
    finally:
        s.close()
        assert proc.stop(signal.SIGTERM, timeout=20) == 0, proc.log_path.read_text()[-2000:]
        subprocess.run(["nft", "delete", "table", "bridge", "segd_gate"], capture_output=True)


def test_demo_prints_matching_matrix_and_cleans_up(docker_host: str) -> None:
    before = set(docker("ps", "-aq").split())
    p = subprocess.run(
        [sys.executable, "-m", "segd", "demo", "--no-wait"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "the matrix matches the policy (20/20 pairs; 2 allowed" in out, out
    rows = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.strip().split(" ")[0] in ("web", "api", "db", "intruder", "forged")
        and ("ALLOW" in line or "deny" in line)
    }
    assert rows["web"] == ["-", "ALLOW", "deny", "deny", "deny"]
    assert rows["api"] == ["deny", "-", "ALLOW", "deny", "deny"]
    assert rows["db"] == ["deny", "deny", "-", "deny", "deny"]
    assert rows["intruder"] == ["deny", "deny", "deny", "-", "deny"]
    assert rows["forged"] == ["deny", "deny", "deny", "deny", "-"]
    # Everything it started is gone: containers, the daemon, the gate.
    assert set(docker("ps", "-aq").split()) <= before
    ps = subprocess.run(["pgrep", "-f", "segd allinone"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "segd_gate" not in tables
