"""Restarted containers pair again without using their key, and what an admin
unpairs or revokes with `--unpair` stays isolated: real Docker, real packets."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from tests.e2e.stack import Stack, docker, restart_dockerd, wait_for

pytestmark = pytest.mark.docker


class Shop:
    """web -> db on tcp/5432 on a fixed-address network, each with a one-use
    key, and an unkeyed intruder."""

    def __init__(self, stack: Stack, *, subnet: str, restart: str = "no", db_lifespan: int = 3600):
        self.stack = stack
        stack.start_server()
        stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
        # The shipped reconcile interval: a restart must not wait for a reconcile.
        stack.start_agent(interval=30.0)
        net = stack.network(f"{subnet}.0/24")
        self.db_ip = f"{subnet}.20"
        self.web_key = stack.key({"role": "web"}, max_uses=1)
        self.db_key = stack.key({"role": "db"}, max_uses=1, lifespan_s=db_lifespan)
        policy = ["--restart", restart]
        self.web = stack.run("web", key=self.web_key, network=net, ip=f"{subnet}.10")
        self.db = stack.run("db", key=self.db_key, network=net, ip=self.db_ip, extra=policy)
        self.intruder = stack.run("intruder", network=net, ip=f"{subnet}.30")
        stack.wait_paired(self.web, self.db)

    def enforced(self) -> bool:
        """web reaches db on 5432 only; the intruder reaches nothing of db."""
        got = self.stack.probe_many(self.web, [(self.db_ip, 5432), (self.db_ip, 80)])
        return got == {(self.db_ip, 5432): True, (self.db_ip, 80): False}

    def wait_enforced_again(self, what: str) -> None:
        # Well within the reconcile interval: the restart alone pairs it again.
        wait_for(self.enforced, 15, f"web -> db:5432 after {what}", interval=0.5)
        assert self.stack.probe_many(self.intruder, [(self.db_ip, 5432)]) == {
            (self.db_ip, 5432): False
        }
        assert self.stack.probe_many(self.db, [(self.stack.ip(self.web), 80)]) == {
            (self.stack.ip(self.web), 80): False
        }

    def uses(self) -> tuple[int, int]:
        return (self.stack.key_row(self.web_key)["uses"], self.stack.key_row(self.db_key)["uses"])

    def readmitted(self) -> int:
        audit = self.stack.api("GET", "/v1/audit?limit=1000")
        return sum(
            1
            for e in audit
            if e["event"] == "workload.paired"
            and e["reason"] == "readmitted"
            and e["container_id"] == self.db
        )


def test_docker_restart_lost_the_pairing_to_key_exhausted(stack: Stack) -> None:
    shop = Shop(stack, subnet="10.231.21")
    docker("restart", "-t", "1", shop.db)
    shop.wait_enforced_again("docker restart")
    assert shop.uses() == (1, 1)
    assert shop.readmitted() >= 1
    assert sorted(w["container_id"] for w in stack.workloads()) == sorted([shop.web, shop.db])


def test_restart_while_its_unpairing_was_on_its_way_waited_for_a_reconcile(stack: Stack) -> None:
    """The server answers nothing while db restarts: the unpairing of its death
    and its pairing on start wait together; they must land in that order."""
    shop = Shop(stack, subnet="10.231.26")
    assert stack.server is not None and stack.server.popen is not None
    pid = stack.server.popen.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        docker("restart", "-t", "1", shop.db)
        time.sleep(1.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    shop.wait_enforced_again("a restart with the server frozen")
    assert shop.uses() == (1, 1)
    assert shop.readmitted() >= 1


def test_restart_policy_after_the_process_exited_lost_the_pairing(stack: Stack) -> None:
    shop = Shop(stack, subnet="10.231.22", restart="always")
    started = docker("inspect", "-f", "{{.State.StartedAt}}", shop.db)
    # The container's process dies (from outside: its own init ignores signals);
    # Docker restarts it.
    os.kill(int(docker("inspect", "-f", "{{.State.Pid}}", shop.db)), signal.SIGKILL)
    wait_for(
        lambda: docker("inspect", "-f", "{{.State.StartedAt}}", shop.db) != started,
        30,
        "Docker to restart db",
    )
    shop.wait_enforced_again("the restart policy")
    assert shop.uses() == (1, 1)
    assert shop.readmitted() >= 1


def test_dockerd_restart_lost_the_pairing_to_key_exhausted(stack: Stack) -> None:
    shop = Shop(stack, subnet="10.231.23", restart="always")
    restart_dockerd()
    # web has no restart policy: it stays down; db comes back with Docker
    wait_for(
        lambda: docker("inspect", "-f", "{{.State.Running}}", shop.db) == "true",
        60,
        "db back after the dockerd restart",
    )
    docker("start", shop.web)
    docker("start", shop.intruder)
    shop.wait_enforced_again("the dockerd restart")
    assert shop.uses() == (1, 1)
    assert shop.readmitted() >= 1


def test_restart_after_the_key_expired_was_refused_key_expired(stack: Stack) -> None:
    shop = Shop(stack, subnet="10.231.24", db_lifespan=10)
    expires_at = stack.key_row(shop.db_key)["expires_at"]
    time.sleep(max(0.0, expires_at - time.time()) + 0.5)
    docker("restart", "-t", "1", shop.db)
    shop.wait_enforced_again("a restart once the key expired")
    assert shop.uses() == (1, 1)
    assert shop.readmitted() >= 1
    # the expired key admits no new container
    late = stack.run("late-db", key=shop.db_key)
    assert stack.agent is not None
    wait_for(
        lambda: any(
            e.get("event") == "pairing.denied" and e.get("code") == "key_expired"
            for e in stack.agent.logs()
        ),
        15,
        "the late container refused",
    )
    assert stack.probe_many(shop.web, [(stack.ip(late), 5432)]) == {(stack.ip(late), 5432): False}


def test_revoked_key_and_unpaired_workload_left_the_rogue_paired(stack: Stack) -> None:
    """Two rogues get web keys. The admin revokes one's key with `--unpair` and
    unpairs the other's workload: both end isolated, also after a restart, and
    nothing else on the host moves."""
    stack.start_server()
    stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    stack.start_agent(interval=1.0)
    net = stack.network("10.231.25.0/24")
    db_ip = "10.231.25.20"
    web = stack.run("web", key=stack.key({"role": "web"}), network=net, ip="10.231.25.10")
    db = stack.run("db", key=stack.key({"role": "db"}), network=net, ip=db_ip)
    rogue_key = stack.key({"role": "web"})
    rogues = {
        "revoked": stack.run("rogue1", key=rogue_key, network=net, ip="10.231.25.31"),
        "unpaired": stack.run(
            "rogue2", key=stack.key({"role": "web"}), network=net, ip="10.231.25.32"
        ),
    }
    stack.wait_paired(web, db, *rogues.values())
    for r in rogues.values():
        assert stack.probe_many(r, [(db_ip, 5432)]) == {(db_ip, 5432): True}
    before = {w["container_id"]: w["id"] for w in stack.workloads()}

    stack.api("POST", f"/v1/keys/{stack.key_row(rogue_key)['key_id']}/revoke", {"unpair": True})
    stack.api("DELETE", f"/v1/workloads/{before[rogues['unpaired']]}")

    def isolated() -> bool:
        return all(
            stack.probe_many(r, [(db_ip, 5432)]) == {(db_ip, 5432): False} for r in rogues.values()
        )

    wait_for(isolated, 15, "the rogues isolated", interval=0.5)
    assert stack.agent is not None
    agent = stack.agent

    def denials() -> Counter[str]:
        return Counter(
            str(e.get("code")) for e in agent.logs() if e.get("event") == "pairing.denied"
        )

    seen = denials()
    for r in rogues.values():
        docker("restart", "-t", "1", r)
    wait_for(
        lambda: all(denials()[c] > seen[c] for c in ("key_revoked", "unpaired_by_admin")),
        20,
        "the restarted rogues refused",
    )
    time.sleep(2.5)  # two reconciles: nothing pairs them again
    assert isolated()
    for r in rogues.values():
        assert stack.probe_many(web, [(stack.ip(r), 80)]) == {(stack.ip(r), 80): False}
    after = {w["container_id"]: w["id"] for w in stack.workloads()}
    assert after == {web: before[web], db: before[db]}, "web and db were not re-paired"
    assert stack.probe_many(web, [(db_ip, 5432), (db_ip, 80)]) == {
        (db_ip, 5432): True,
        (db_ip, 80): False,
    }
