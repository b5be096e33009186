"""Containers that share another container's network namespace, on the real stack.

`docker run --network container:X` (compose `network_mode: service:x`) puts a
sidecar in X's namespace. One namespace has one owner: X decides its table; the
sidecar is never enforced on its own, and never causes a write into the host's
namespace when X is host-networked.
"""

from __future__ import annotations

import socket
import subprocess
from typing import Any

import pytest

from tests.e2e.stack import Stack, docker, wait_for

pytestmark = pytest.mark.docker

IDLE = "exec sleep 100000"  # a sidecar in X's namespace cannot serve X's ports again
INTERVAL = 0.5  # the shortest reconcile interval: many reconciles in little time


def _ns_table(cid: str) -> str:
    pid = docker("inspect", "-f", "{{.State.Pid}}", cid)
    p = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "nft", "list", "table", "inet", "segd"],
        capture_output=True,
        text=True,
    )
    return p.stdout if p.returncode == 0 else ""


def _reconciles(stack: Stack, n: int) -> None:
    """Wait until the agent has finished `n` more full reconciles."""
    assert stack.agent is not None
    agent = stack.agent
    start = agent.count("agent.synced")
    wait_for(lambda: agent.count("agent.synced") >= start + n, 15, f"{n} reconciles")


def _tamper_audits(stack: Stack) -> list[dict[str, Any]]:
    return [e for e in stack.api("GET", "/v1/audit?limit=1000") if e["event"] == "agent.tamper"]


def _sidecars_of(stack: Stack, cid: str) -> list[str]:
    for w in stack.workloads():
        if w["container_id"] == cid:
            return [s["container_id"] for s in w.get("sidecars", [])]
    raise AssertionError(f"{cid[:12]} is not a workload")


def _db_and_web(stack: Stack) -> tuple[str, str]:
    stack.start_server()
    stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    stack.start_agent(interval=INTERVAL)
    web = stack.run("web", key=stack.key({"role": "web"}))
    db = stack.run("db", key=stack.key({"role": "db"}))
    stack.wait_paired(web, db)
    return web, db


def _assert_db_policy(stack: Stack, web: str, db: str, sidecar: str) -> None:
    """db's own policy, whichever of the two processes in its namespace is asked."""
    db_ip, web_ip = stack.ip(db), stack.ip(web)
    assert stack.probe_many(web, [(db_ip, 5432), (db_ip, 80)]) == {
        (db_ip, 5432): True,
        (db_ip, 80): False,
    }
    # db may not open connections to anyone; its sidecar's traffic is db's traffic.
    assert stack.probe_many(sidecar, [(web_ip, 80)]) == {(web_ip, 80): False}


def test_unkeyed_sidecar_does_not_isolate_the_container_it_shares(stack: Stack) -> None:
    web, db = _db_and_web(stack)
    table = _ns_table(db)
    assert "ls_" in table  # db's workload table, with its peer set
    side = stack.run("db-side", network=f"container:{db}", cmd=IDLE)
    _reconciles(stack, 2)
    assert _ns_table(db) == table
    _assert_db_policy(stack, web, db, side)
    _reconciles(stack, 2)
    assert _ns_table(db) == table, "the namespace's table changed between reconciles"
    _assert_db_policy(stack, web, db, side)
    assert _tamper_audits(stack) == []
    assert stack.agent is not None
    assert stack.agent.count("container.shares_namespace") == 1, "logged once"
    assert side not in {w["container_id"] for w in stack.workloads()}
    wait_for(lambda: _sidecars_of(stack, db) == [side], 10, "the sidecar in workload list")


def test_keyed_sidecar_does_not_replace_the_policy_of_the_container_it_shares(
    stack: Stack,
) -> None:
    web, db = _db_and_web(stack)
    table = _ns_table(db)
    side_key = stack.key({"role": "web"})
    side = stack.run("db-side", key=side_key, network=f"container:{db}", cmd=IDLE)
    _reconciles(stack, 2)
    _assert_db_policy(stack, web, db, side)
    _reconciles(stack, 2)
    assert _ns_table(db) == table
    _assert_db_policy(stack, web, db, side)
    assert _tamper_audits(stack) == []
    assert side not in {w["container_id"] for w in stack.workloads()}
    # The sidecar's key admitted nothing: its use is still there.
    assert [k["uses"] for k in stack.api("GET", "/v1/keys")][-1] == 0
    wait_for(lambda: _sidecars_of(stack, db) == [side], 10, "the sidecar in workload list")


def test_sidecar_listed_before_its_main_when_the_agent_starts(stack: Stack) -> None:
    """Both start while the agent is down; Docker lists the newest (the sidecar)
    first, so the agent's first reconcile meets it before its main."""
    stack.start_server()
    stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    web = stack.run("web", key=stack.key({"role": "web"}))
    db = stack.run("db", key=stack.key({"role": "db"}))
    side = stack.run("db-side", network=f"container:{db}", cmd=IDLE)
    stack.start_agent(interval=INTERVAL)
    stack.wait_paired(web, db)
    _reconciles(stack, 2)
    table = _ns_table(db)
    assert "ls_" in table
    _assert_db_policy(stack, web, db, side)
    _reconciles(stack, 2)
    assert _ns_table(db) == table
    assert _tamper_audits(stack) == []
    wait_for(lambda: _sidecars_of(stack, db) == [side], 10, "the sidecar in workload list")


def test_main_restarted_under_a_living_sidecar_is_enforced_again(stack: Stack) -> None:
    web, db = _db_and_web(stack)
    side = stack.run("db-side", network=f"container:{db}", cmd=IDLE)
    wait_for(lambda: _sidecars_of(stack, db) == [side], 10, "the sidecar in workload list")
    docker("restart", "-t", "0", db)
    # db has a new namespace (Docker leaves the sidecar in the old, emptied one).
    wait_for(lambda: "ls_" in _ns_table(db), 15, "db's table in its new namespace")
    _reconciles(stack, 2)
    db_ip = stack.ip(db)
    assert stack.probe_many(web, [(db_ip, 5432), (db_ip, 80)]) == {
        (db_ip, 5432): True,
        (db_ip, 80): False,
    }
    assert _tamper_audits(stack) == []
    assert side not in {w["container_id"] for w in stack.workloads()}


def _host_ruleset() -> str:
    """The host namespace's ruleset, without segd's own gate table."""
    out = subprocess.run(
        ["nft", "list", "ruleset"], capture_output=True, text=True, check=True
    ).stdout
    kept: list[str] = []
    skipping = False
    for line in out.splitlines():
        if line.startswith("table bridge segd_gate"):
            skipping = True
        elif skipping and line == "}":
            skipping = False
            continue
        if not skipping:
            kept.append(line)
    return "\n".join(kept)


def test_sidecar_of_a_host_networked_container_leaves_the_host_alone(stack: Stack) -> None:
    stack.start_server()
    # Anyone, the host too, may reach web:80.
    stack.api(
        "POST",
        "/v1/rules",
        {"providers": [{"role": "web"}], "consumers": "any", "services": ["tcp/80"]},
    )
    stack.start_agent(interval=INTERVAL)
    web = stack.run("web", key=stack.key({"role": "web"}))
    stack.wait_paired(web)
    web_ip = stack.ip(web)
    with socket.create_connection((web_ip, 80), timeout=2):
        pass
    before = _host_ruleset()
    hostnet = stack.run("hostnet", network="host", cmd=IDLE)
    sidecars = [
        stack.run("host-side", network=f"container:{hostnet}", cmd=IDLE),
        stack.run(
            "host-side-keyed",
            key=stack.key({"role": "web"}),
            network=f"container:{hostnet}",
            cmd=IDLE,
        ),
    ]
    _reconciles(stack, 3)
    assert _host_ruleset() == before
    # The host keeps its network: it still reaches a container over the bridge.
    with socket.create_connection((web_ip, 80), timeout=2):
        pass
    paired = {w["container_id"] for w in stack.workloads()}
    assert paired == {web} and not set(sidecars) & paired
    assert [k["uses"] for k in stack.api("GET", "/v1/keys")][-1] == 0
    assert stack.agent is not None
    assert stack.agent.count("container.host_namespace") == 3, "each logged once"
