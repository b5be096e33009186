"""An `encrypted` rule across two simulated hosts with agents in the mesh: its
traffic goes through WireGuard; with wireguard-go killed on one side it is
dropped and nothing crosses the underlay in clear, until the agent's periodic
check brings the interface back."""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from segd import wire
from segd.bed import IMAGE, Bed, BedAgent
from tests.bed.test_mesh_dataplane import Capture, in_clear
from tests.e2e.stack import Stack, wait_for
from tests.hostreq import mesh_missing, require
from tests.meshproc import kill_wireguard_go

pytestmark = pytest.mark.bed


@pytest.fixture(scope="module", autouse=True)
def _mesh_tools() -> None:
    require(mesh_missing())


BED_HOSTS = 2
SERVE = "httpd -p 5432 -h /www && httpd -p 8080 -h /www && exec sleep 100000"


def _applied(a: BedAgent) -> bool:
    return a.count("mesh.applied") > 0


class Pair:
    def __init__(self, bed: Bed, stack: Stack, agents: list[BedAgent], db: str) -> None:
        self.bed, self.stack, self.agents, self.db = bed, stack, agents, db

    def probe(self, port: int = 5432) -> bool:
        return self.bed.host(2).probe("api", [(self.db, port)], wait=2)[(self.db, port)]


@pytest.fixture(scope="module")
def pair(bed: Bed) -> Iterator[Pair]:
    with tempfile.TemporaryDirectory(prefix="segd-enc-") as tmp:
        root = Path(tmp)
        stack = Stack(root, listen_host=bed.root_address)
        agents: list[BedAgent] = []
        try:
            stack.start_server('[server.mesh]\npool = "10.213.0.0/16"\n')
            body = wire.RuleIn(
                providers=[{"role": "db"}],
                consumers=[{"role": "api"}],
                services=["tcp/5432"],
                options=["encrypted"],
            )
            stack.api("POST", "/v1/rules", body)
            keys = {r: stack.key({"role": r}) for r in ("api", "db")}
            for h in bed.hosts:
                code = stack.api("POST", "/v1/activation-codes", {})["code"]
                agents.append(
                    h.start_agent(
                        stack.url,
                        code,
                        workdir=root / h.name,
                        options={"reconcile_interval_s": 1.0, "backoff_max_s": 2.0},
                        mesh={"enabled": True, "wireguard": "userspace"},
                    )
                )
            for a in agents:
                a.wait_for(functools.partial(_applied, a), 30, "the mesh applied")
            for role, h in (("db", bed.host(1)), ("api", bed.host(2))):
                h.docker(
                    "run", "-d", "--name", role, "--network", "segd",
                    "--label", f"segd.pairing-key={keys[role]}", IMAGE, "sh", "-c", SERVE,
                )  # fmt: skip
            db = bed.host(1).docker(
                "inspect", "-f", "{{.NetworkSettings.Networks.segd.IPAddress}}", "db"
            )
            p = Pair(bed, stack, agents, db)
            wait_for(p.probe, 60, "api -> db through the mesh", interval=0.5)
            yield p
        finally:
            for h in bed.hosts:
                for role in ("api", "db"):
                    h.docker("rm", "-f", role, check=False)
            for a in agents:
                a.stop()
            stack.close()


def _kill_wireguard_go(netns: str) -> None:
    kill_wireguard_go(netns)


def test_the_encrypted_rule_works_through_the_mesh_only(pair: Pair) -> None:
    cap = Capture(Path(tempfile.mkdtemp(prefix="segd-enc-")) / "ok.pcap")
    try:
        assert pair.probe()
        assert not pair.probe(8080)  # not in the rule
    finally:
        lines = cap.stop()
    assert any(".51820 > " in ln for ln in lines)
    assert in_clear(lines) == [], in_clear(lines)[:10]


def test_wireguard_go_killed_drops_it_and_the_agent_brings_the_mesh_back(pair: Pair) -> None:
    h2, a2 = pair.bed.host(2), pair.agents[1]
    a2.stop()  # nobody repairs while the drop is checked
    _kill_wireguard_go(h2.plan.netns_path)
    wait_for(lambda: "segd-wg" not in h2.run("ip", "link", "show").stdout, 10, "the TUN gone")
    cap = Capture(Path(tempfile.mkdtemp(prefix="segd-enc-")) / "killed.pcap")
    try:
        assert [pair.probe() for _ in range(3)] == [False] * 3
    finally:
        lines = cap.stop()
    assert in_clear(lines) == [], in_clear(lines)[:10]

    a2.start()  # makes the interface again at start
    wait_for(pair.probe, 60, "api -> db again once the agent restarted wireguard-go")

    # Killed while the agent runs: its periodic check notices and applies again.
    drift = a2.count("mesh.drift")
    _kill_wireguard_go(h2.plan.netns_path)
    wait_for(lambda: a2.count("mesh.drift") > drift, 30, "the agent noticing")
    wait_for(pair.probe, 60, "api -> db again after the periodic check")
