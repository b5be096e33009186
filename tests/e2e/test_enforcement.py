"""Enforcement on the real stack: real Docker, real nftables, real packets."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.e2e.stack import Stack, docker, wait_for

pytestmark = pytest.mark.docker

PORTS = (5432, 80)


def _shop(stack: Stack) -> dict[str, str]:
    """web, db, other with keys; web -> db on tcp/5432; and three that must be isolated."""
    stack.start_server()
    stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    stack.start_agent()
    revoked = stack.key({"role": "web"})
    key_id = stack.api("GET", "/v1/keys")[-1]["key_id"]
    stack.api("POST", f"/v1/keys/{key_id}/revoke")
    exhausted = stack.key({"role": "web"}, max_uses=1)
    names = {
        "web": stack.run("web", key=stack.key({"role": "web"})),
        "db": stack.run("db", key=stack.key({"role": "db"})),
        "other": stack.run("other", key=stack.key({"role": "other"})),
        "burner": stack.run("burner", key=exhausted),  # consumes the only use
    }
    stack.wait_paired(*names.values())
    forged = revoked[:-4] + ("AAAA" if not revoked.endswith("AAAA") else "BBBB")
    names["nokey"] = stack.run("nokey")
    names["forged"] = stack.run("forged", key=forged)
    names["revoked"] = stack.run("revoked", key=revoked)
    names["exhausted"] = stack.run("exhausted", key=exhausted)
    assert stack.agent is not None
    wait_for(lambda: stack.agent.count("pairing.denied") >= 3, 15, "three denials")
    return names


def test_policy_matrix_on_every_ordered_pair(stack: Stack) -> None:
    names = _shop(stack)
    got = stack.matrix(names, PORTS)
    # burner is a legitimate role=web workload (it used the exhausted key's only use).
    expected = {k: k[0] in ("web", "burner") and k[1] == "db" and k[2] == 5432 for k in got}
    wrong = {k: v for k, v in got.items() if v != expected[k]}
    assert not wrong, f"unexpected reachability (src, dst, port) -> got: {wrong}"
    assert sum(got.values()) == 2 and len(got) == 8 * 7 * 2


def test_tight_loop_from_first_instant_gets_nothing_through(stack: Stack) -> None:
    stack.start_server()
    stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    stack.start_agent()
    db = stack.run("db", key=stack.key({"role": "db"}))
    stack.wait_paired(db)
    db_ip = stack.ip(db)
    bridge_ip = docker("network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", "bridge")
    srv = subprocess.Popen(  # a listener on the host's bridge address counting accepts
        [
            "python3",
            "-c",
            (
                "import socket,sys\n"
                f"s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                f"s.bind(('{bridge_ip}', 18099)); s.listen(64); print('up', flush=True)\n"
                "while True:\n c,_=s.accept(); print('hit', flush=True); c.close()\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "up"
        loop = (
            "i=0; while [ $i -lt 400 ]; do "
            f"nc -w 1 {db_ip} 5432 </dev/null >/dev/null 2>&1 && echo PEER; "
            f"nc -w 1 {bridge_ip} 18099 </dev/null >/dev/null 2>&1 && echo HOST; "
            "i=$((i+1)); done; sleep 100000"
        )
        # An intruder with no key, and one whose key is valid but not allowed to db.
        intruders = [
            stack.run("intruder", cmd=loop),
            stack.run("other", key=stack.key({"role": "other"}), cmd=loop),
        ]
        # A web that is allowed: it must get through within a second of start.
        t0 = time.monotonic()
        web = stack.run(
            "web",
            key=stack.key({"role": "web"}),
            cmd=f"until nc -w 1 {db_ip} 5432 </dev/null; do :; done; echo OPEN; sleep 100000",
        )
        wait_for(lambda: "OPEN" in docker("logs", web), 5, "allowed connection from web")
        opened = time.monotonic() - t0
        time.sleep(3)
        for c in intruders:
            out = docker("logs", c)
            assert "PEER" not in out and "HOST" not in out, out
        srv.terminate()
        out, _ = srv.communicate(timeout=5)
        assert out.count("hit") == 0, f"{out.count('hit')} connections reached the host listener"
        assert opened < 1.0 + 0.5, f"allowed connection took {opened:.2f}s (incl. docker run)"
    finally:
        srv.kill()


def test_removed_peer_leaves_sets_and_reused_ip_is_unreachable(stack: Stack) -> None:
    stack.start_server()
    stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    stack.start_agent()
    net = stack.network("10.231.7.0/24")
    web = stack.run("web", key=stack.key({"role": "web"}), network=net, ip="10.231.7.10")
    db = stack.run("db", key=stack.key({"role": "db"}), network=net, ip="10.231.7.20")
    stack.wait_paired(web, db)
    assert stack.probe_many(web, [("10.231.7.20", 5432)]) == {("10.231.7.20", 5432): True}
    assert "10.231.7.20" in _web_sets(web)
    stack.rm(db)
    wait_for(lambda: "10.231.7.20" not in _web_sets(web), 10, "db IP leaving web's sets")
    stack.run("squatter", network=net, ip="10.231.7.20")
    time.sleep(0.5)
    assert stack.probe_many(web, [("10.231.7.20", 5432)]) == {("10.231.7.20", 5432): False}


def _web_sets(cid: str) -> str:
    pid = docker("inspect", "-f", "{{.State.Pid}}", cid)
    return subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "nft", "list", "table", "inet", "segd"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_agent_killed_enforcement_stays_and_restart_pairs_newcomers(stack: Stack) -> None:
    stack.start_server()
    stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    stack.start_agent()
    web = stack.run("web", key=stack.key({"role": "web"}))
    db = stack.run("db", key=stack.key({"role": "db"}))
    stack.wait_paired(web, db)
    db_ip = stack.ip(db)
    assert stack.agent is not None
    stack.agent.stop(signal.SIGKILL)
    # Enforcement is kernel state: still there with the agent gone.
    assert stack.probe_many(web, [(db_ip, 5432), (db_ip, 80)]) == {
        (db_ip, 5432): True,
        (db_ip, 80): False,
    }
    late = stack.run("late-web", key=stack.key({"role": "web"}))
    late_ip = stack.ip(late)
    # Started while the agent is down: isolated (the gate holds it), both ways.
    assert stack.probe_many(late, [(db_ip, 5432)]) == {(db_ip, 5432): False}
    assert stack.probe_many(web, [(late_ip, 80)]) == {(late_ip, 80): False}
    stack.start_agent()
    stack.wait_paired(late)
    assert stack.probe_many(late, [(db_ip, 5432)]) == {(db_ip, 5432): True}
    paired = [w["container_id"] for w in stack.workloads()]
    assert sorted(paired) == sorted({web, db, late}), "no duplicate pairings"


def test_flushed_table_is_repaired_and_audited(stack: Stack) -> None:
    stack.start_server()
    stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    stack.start_agent(interval=1.0)
    web = stack.run("web", key=stack.key({"role": "web"}))
    db = stack.run("db", key=stack.key({"role": "db"}), extra=["--cap-add", "NET_ADMIN"])
    stack.wait_paired(web, db)
    db_ip = stack.ip(db)
    # The container flushes its own table from inside (it has CAP_NET_ADMIN).
    pid = docker("inspect", "-f", "{{.State.Pid}}", db)
    subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "nft", "flush", "ruleset"], check=True)
    web_ip = stack.ip(web)
    wait_for(
        lambda: "agent.tamper" in {e["event"] for e in stack.api("GET", "/v1/audit?limit=200")},
        10,
        "tamper audit",
    )
    assert stack.probe_many(web, [(db_ip, 5432)]) == {(db_ip, 5432): True}
    assert stack.probe_many(db, [(web_ip, 80)]) == {(web_ip, 80): False}
    assert "ls_" in _web_sets(db)


def test_gate_deleted_behind_the_agents_back_is_rebuilt_and_audited(stack: Stack) -> None:
    stack.start_server()
    stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    stack.start_agent(interval=1.0)
    web = stack.run("web", key=stack.key({"role": "web"}))
    db = stack.run("db", key=stack.key({"role": "db"}))
    stack.wait_paired(web, db)
    subprocess.run(["nft", "delete", "table", "bridge", "segd_gate"], check=True)
    # A newcomer arrives while the gate is gone; the agent must not stop over it.
    late = stack.run("late", key=stack.key({"role": "web"}))
    stack.wait_paired(late)
    wait_for(
        lambda: (
            subprocess.run(
                ["nft", "list", "table", "bridge", "segd_gate"], capture_output=True
            ).returncode
            == 0
        ),
        10,
        "the gate to be rebuilt",
    )
    audit = stack.api("GET", "/v1/audit?limit=200")
    assert any(e["event"] == "agent.tamper" and "gate" in e["detail"] for e in audit), audit
    db_ip = stack.ip(db)
    for src in (web, late):
        assert stack.probe_many(src, [(db_ip, 5432)]) == {(db_ip, 5432): True}
    assert stack.agent is not None and stack.agent.popen is not None
    assert stack.agent.popen.poll() is None, "the agent is still running"


def test_rollout_switch_leaves_unkeyed_containers_alone(stack: Stack) -> None:
    """`isolate_unkeyed = false`: unkeyed containers keep talking; keyed ones are enforced."""
    stack.start_server()
    stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    stack.start_agent(isolate_unkeyed=False)
    legacy_a = stack.run("legacy-a")
    legacy_b = stack.run("legacy-b")
    db = stack.run("db", key=stack.key({"role": "db"}))
    stack.wait_paired(db)
    time.sleep(0.5)
    a_ip, b_ip, db_ip = stack.ip(legacy_a), stack.ip(legacy_b), stack.ip(db)
    assert stack.probe_many(legacy_a, [(b_ip, 80), (db_ip, 5432)]) == {
        (b_ip, 80): True,  # both unkeyed: left alone
        (db_ip, 5432): False,  # db is enforced: only web may use it
    }
    assert stack.probe_many(db, [(a_ip, 80)]) == {(a_ip, 80): False}
    assert _table_absent(legacy_a)


def _table_absent(cid: str) -> bool:
    pid = docker("inspect", "-f", "{{.State.Pid}}", cid)
    p = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "nft", "list", "table", "inet", "segd"],
        capture_output=True,
    )
    return p.returncode != 0
