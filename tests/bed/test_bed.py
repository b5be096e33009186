"""The multi-host test bed (segd.bed) does what its users rely on: three Docker
hosts with the same docker0, an underlay that joins them and the root namespace,
published ports, and one segd agent per host enforcing against one server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from segd.bed import IMAGE, Bed, BedAgent, BedHost
from segd.bed.plan import RUN_DIR
from tests.e2e.stack import Stack, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.bed]

T = TypeVar("T")
SERVE = "httpd -p 5432 -h /www && httpd -p 80 -h /www && exec sleep 100000"


def _each(bed: Bed, fn: Callable[[BedHost], T]) -> list[T]:
    with ThreadPoolExecutor(len(bed.hosts)) as pool:
        return list(pool.map(fn, bed.hosts))


def test_every_host_has_its_own_docker0_and_the_same_first_address(bed: Bed) -> None:
    def first_container(h: BedHost) -> tuple[str, str]:
        cid = h.docker("run", "-d", "--name", "first", IMAGE, "sleep", "1000")
        try:
            ip = h.docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", cid)
            return ip, h.run("ip", "-4", "-o", "addr", "show", "docker0").stdout.split()[3]
        finally:
            h.docker("rm", "-f", cid)

    assert _each(bed, first_container) == [("172.17.0.2", "172.17.0.1/16")] * 3


def test_hosts_reach_the_root_and_each_other_on_the_underlay(bed: Bed) -> None:
    assert [h.address for h in bed.hosts] == ["10.250.0.11", "10.250.0.12", "10.250.0.13"]

    def reach(h: BedHost) -> list[bool]:
        return [h.ping(a) for a in [bed.root_address, *(o.address for o in bed.hosts)]]

    assert _each(bed, reach) == [[True] * 4] * 3


def test_each_host_has_its_own_mount_namespace(bed: Bed) -> None:
    h1, h2 = bed.host(1), bed.host(2)
    d = RUN_DIR / "private"
    for h in (h1, h2):
        h.private_dir(d)
        h.run("sh", "-c", f"echo {h.name} > {d}/who")
    assert [h.run("cat", f"{d}/who").stdout for h in (h1, h2)] == ["segd-bed-h1\n", "segd-bed-h2\n"]
    assert not (d / "who").exists()  # not in the root namespace
    # What the engine mounts (a container's netns file) is there for the host's agents.
    cid = h1.docker("run", "-d", IMAGE, "sleep", "1000")
    try:
        key = h1.docker("inspect", "-f", "{{.NetworkSettings.SandboxKey}}", cid)
        addrs = h1.run("nsenter", f"--net={key}", "ip", "-4", "-o", "addr", "show", "eth0").stdout
        assert " 172.17.0.2/16 " in addrs
        outside = subprocess.run(["nsenter", f"--net={key}", "true"], capture_output=True)
        assert outside.returncode != 0  # the root namespace sees no such mount
    finally:
        h1.docker("rm", "-f", cid)


def test_the_root_namespace_reaches_a_port_published_on_host_2(bed: Bed) -> None:
    h2 = bed.host(2)
    cid = h2.docker("run", "-d", "-p", "8080:80", IMAGE, "httpd", "-f", "-p", "80", "-h", "/www")
    try:

        def fetch(address: str) -> bytes:
            try:
                with socket.create_connection((address, 8080), timeout=2) as s:
                    s.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
                    return b"".join(iter(lambda: s.recv(4096), b""))
            except OSError:
                return b""

        page = wait_for(lambda: fetch(h2.address), 15, "the published page")
        assert page.startswith(b"HTTP/1.") and b"segd test page" in page
        assert fetch(bed.host(1).address) == b""  # nothing published on host 1
    finally:
        h2.docker("rm", "-f", cid)


def test_one_agent_per_host_pairs_and_enforces_on_every_host(bed: Bed, tmp_path: Path) -> None:
    stack = Stack(tmp_path, listen_host=bed.root_address)
    agents: list[BedAgent] = []
    try:
        stack.start_server()
        stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
        keys = {role: stack.key({"role": role}) for role in ("web", "db", "other")}

        def start(h: BedHost) -> BedAgent:
            code = stack.api("POST", "/v1/activation-codes", {})["code"]
            options = {"reconcile_interval_s": 2.0, "backoff_max_s": 2.0}
            return h.start_agent(stack.url, code, workdir=tmp_path / h.name, options=options)

        agents += _each(bed, start)
        hosts = stack.api("GET", "/v1/hosts")
        assert sorted(h["hostname"] for h in hosts) == [h.name for h in bed.hosts]

        def shop(h: BedHost) -> dict[str, str]:
            # Distinct subnets: today's server holds container addresses fleet-unique.
            net = f"10.231.{100 + h.index}"
            h.docker("network", "create", "--subnet", f"{net}.0/24", "shop")
            out = {}
            for role, last in (("db", 20), ("web", 30), ("other", 40)):
                out[role] = h.docker(
                    "run", "-d", "--name", role, "--network", "shop", "--ip", f"{net}.{last}",
                    "--label", f"segd.pairing-key={keys[role]}", IMAGE, "sh", "-c", SERVE,
                )  # fmt: skip
            return out

        shops = _each(bed, shop)

        def enforced(agent: BedAgent, cids: list[str]) -> bool:
            done = {
                str(e.get("container"))
                for e in agent.logs()
                if e.get("event") == "enforce.done" and e.get("kind") == "workload"
            }
            return all(any(c.startswith(d) for d in done) for c in cids)

        every = [c for s in shops for c in s.values()]
        wait_for(
            lambda: (
                {w["container_id"] for w in stack.workloads()} >= set(every)
                and all(enforced(a, list(s.values())) for a, s in zip(agents, shops, strict=True))
            ),
            30,
            "pairing and enforcement on every host",
            interval=0.1,
        )

        def probes(h: BedHost) -> dict[str, bool]:
            db = f"10.231.{100 + h.index}.20"
            web = h.probe("web", [(db, 5432), (db, 80)])
            other = h.probe("other", [(db, 5432)])
            return {
                "web->db:5432": web[(db, 5432)],
                "web->db:80": web[(db, 80)],
                "other->db:5432": other[(db, 5432)],
            }

        expected = {"web->db:5432": True, "web->db:80": False, "other->db:5432": False}
        assert _each(bed, probes) == [expected] * 3

        # Still one agent per host: a second one on host 1 exits with one line.
        h1 = bed.host(1)
        second = tmp_path / "second.toml"
        second.write_text(
            f'[agent]\nserver = "{stack.url}"\nstate_dir = "{tmp_path / "second"}"\n'
            f'docker_url = "{h1.docker_url}"\nactivation_code = "act_unused"\n'
        )
        p = h1.run(sys.executable, "-m", "segd", "agent", "--config", str(second), check=False)
        lock = f"/run/segd/agent.{os.stat(h1.plan.netns_path).st_ino}.lock"
        assert (p.returncode, p.stderr.strip().splitlines()) == (
            1,
            [f"segd agent: another agent is running on this host ({lock})"],
        )
        assert all(a.running() for a in agents)
    finally:
        for a in agents:
            a.stop()
        stack.close()


def test_an_agent_is_killed_and_restarted_with_its_identity(bed: Bed, tmp_path: Path) -> None:
    stack = Stack(tmp_path, listen_host=bed.root_address)
    try:
        stack.start_server()
        code = stack.api("POST", "/v1/activation-codes", {})["code"]
        agent = bed.host(3).start_agent(stack.url, code, workdir=tmp_path / "a3")
        assert agent.kill() == -9
        agent.start()  # the code is spent: it runs on the identity in its state_dir
        assert len(stack.api("GET", "/v1/hosts")) == 1
        assert agent.count("agent.registered") == 1
        assert agent.stop() == 0
    finally:
        stack.close()
