"""Faults around the agent on the real stack: the server away, the agent killed
while things change, Docker restarted. Enforcement must hold throughout."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.e2e.stack import Stack, docker, restart_dockerd, wait_for

pytestmark = pytest.mark.docker

# Tries db:5432 in a tight loop and prints HIT for every connection that got through.
INTRUDER = "while true; do nc -w 1 {ip} {port} </dev/null >/dev/null 2>&1 && echo HIT; done"


def _hits(cid: str) -> int:
    return docker("logs", cid).count("HIT")


def test_server_down_agent_enforces_last_instructions_and_recovers(stack: Stack) -> None:
    stack.start_server()
    stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    stack.start_agent()
    late_key = stack.key({"role": "web"})
    web = stack.run("web", key=stack.key({"role": "web"}))
    db = stack.run("db", key=stack.key({"role": "db"}))
    stack.wait_paired(web, db)
    db_ip = stack.ip(db)
    assert stack.server is not None and stack.agent is not None
    stack.server.stop(signal.SIGKILL)

    # The server is gone: what was enforced stays enforced.
    assert stack.probe_many(web, [(db_ip, 5432), (db_ip, 80)]) == {
        (db_ip, 5432): True,
        (db_ip, 80): False,
    }
    # A restarted agent enforces its last verified instructions from disk.
    stack.agent.stop(signal.SIGKILL)
    stack.start_agent()
    assert stack.agent.count("instructions.loaded") >= 1
    assert stack.probe_many(web, [(db_ip, 5432), (db_ip, 80)]) == {
        (db_ip, 5432): True,
        (db_ip, 80): False,
    }
    # Started while the server is down: isolated both ways, pairing pending.
    late = stack.run("late", key=late_key)
    late_ip = stack.ip(late)
    time.sleep(1.0)
    assert stack.probe_many(late, [(db_ip, 5432)]) == {(db_ip, 5432): False}
    assert stack.probe_many(web, [(late_ip, 80)]) == {(late_ip, 80): False}

    time.sleep(3.0)  # let the agent's backoff grow a little
    t0 = time.monotonic()
    stack.start_server()
    stack.wait_paired(late, timeout=20)
    took = time.monotonic() - t0
    # db's instructions changed too (late joined the web set): the peer updated.
    wait_for(lambda: stack.probe_many(late, [(db_ip, 5432)])[(db_ip, 5432)], 10, "late -> db:5432")
    assert took < 10, f"pairing took {took:.1f}s after the server came back"
    assert sorted(w["container_id"] for w in stack.workloads()) == sorted([web, db, late])


def test_agent_killed_while_containers_come_and_go(stack: Stack) -> None:
    stack.start_server()
    stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    stack.start_agent()
    net = stack.network("10.231.9.0/24")
    web = stack.run("web", key=stack.key({"role": "web"}), network=net, ip="10.231.9.10")
    db = stack.run("db", key=stack.key({"role": "db"}), network=net, ip="10.231.9.20")
    intruder = stack.run("intruder", network=net, cmd=INTRUDER.format(ip="10.231.9.20", port=5432))
    stack.wait_paired(web, db)
    db2_key = stack.key({"role": "db"})
    assert stack.agent is not None
    stack.agent.stop(signal.SIGKILL)

    # While the agent is down: db goes, a squatter takes its IP, a new db arrives.
    stack.rm(db)
    squatter = stack.run("squatter", network=net, ip="10.231.9.20")
    db2 = stack.run("db2", key=db2_key, network=net, ip="10.231.9.30")
    time.sleep(1.0)
    # The gate binds each admitted IP to its container's bridge port: the squatter
    # on a new port with the old IP stays dark even with the agent down.
    down = stack.probe_many(web, [("10.231.9.20", 5432), ("10.231.9.30", 5432)])
    assert down == {("10.231.9.20", 5432): False, ("10.231.9.30", 5432): False}
    assert stack.probe_many(squatter, [("10.231.9.10", 80)]) == {("10.231.9.10", 80): False}

    stack.start_agent()
    stack.wait_paired(db2)
    wait_for(
        lambda: sorted(w["container_id"] for w in stack.workloads()) == sorted([web, db2]),
        10,
        "the dead db to be unpaired, no duplicates",
    )
    after = stack.probe_many(web, [("10.231.9.20", 5432), ("10.231.9.30", 5432)])
    assert after == {("10.231.9.20", 5432): False, ("10.231.9.30", 5432): True}
    assert _hits(intruder) == 0


def test_docker_restarted_stream_reconnects_and_nothing_is_left_open(stack: Stack) -> None:
    stack.start_server()
    stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    stack.start_agent()
    net = stack.network("10.231.11.0/24")
    always = ["--restart", "always"]
    web = stack.run(
        "web", key=stack.key({"role": "web"}), network=net, ip="10.231.11.10", extra=always
    )
    db = stack.run(
        "db", key=stack.key({"role": "db"}), network=net, ip="10.231.11.20", extra=always
    )
    intruder = stack.run(
        "intruder",
        network=net,
        ip="10.231.11.30",
        extra=always,
        cmd=INTRUDER.format(ip="10.231.11.20", port=5432),
    )
    stack.wait_paired(web, db)
    assert stack.agent is not None
    ups = stack.agent.count("docker.stream.up")
    restart_dockerd()
    wait_for(lambda: stack.agent.count("docker.stream.up") > ups, 30, "event stream back")
    wait_for(
        lambda: stack.probe_many(web, [("10.231.11.20", 5432)])[("10.231.11.20", 5432)],
        20,
        "web -> db after the restart",
    )
    assert stack.probe_many(web, [("10.231.11.20", 80)]) == {("10.231.11.20", 80): False}
    assert stack.probe_many(intruder, [("10.231.11.20", 5432)]) == {("10.231.11.20", 5432): False}
    assert stack.probe_many(db, [("10.231.11.30", 80)]) == {("10.231.11.30", 80): False}
    assert _hits(intruder) == 0
    assert sorted(w["container_id"] for w in stack.workloads()) == sorted([web, db])


def test_a_second_agent_on_the_host_refuses_to_start(stack: Stack) -> None:
    stack.start_server()
    stack.start_agent()
    cfg = stack.root / "second.toml"
    cfg.write_text(
        f'[agent]\nserver = "{stack.url}"\nstate_dir = "{stack.root / "second"}"\n'
        'activation_code = "act_unused"\n'
    )
    p = subprocess.run(
        [sys.executable, "-m", "segd", "agent", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "segd agent: another agent is running on this host (/run/segd/agent.lock)"
    ]
    assert stack.agent is not None and stack.agent.popen is not None
    assert stack.agent.popen.poll() is None
