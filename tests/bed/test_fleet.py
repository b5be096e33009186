"""The fleet on the test bed: one server with a mesh pool, one agent per simulated
host with `[agent.mesh] enabled`, the shop spread over three hosts (web on host 1,
api on host 2, db on host 3) on the `segd` network, real packets."""

from __future__ import annotations

import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from segd.bed import IMAGE, Bed, BedAgent, BedHost
from tests.e2e.stack import Stack, wait_for
from tests.hostreq import mesh_missing, require
from tests.kernel.test_firewall_gate import _RAW

pytestmark = pytest.mark.bed


@pytest.fixture(scope="module", autouse=True)
def _mesh_tools() -> None:
    require(mesh_missing())


BED_HOSTS = 3
POOL = "10.213.0.0/16"
PORTS = (8080, 5432)
SERVER_CONFIG = f'[server.mesh]\npool = "{POOL}"\nhost_prefix = 24\n'
SERVE = "httpd -p 5432 -h /www && httpd -p 8080 -h /www && exec sleep 100000"
ROLES = {"web": 1, "api": 2, "db": 3}  # role -> host
ALLOWED = {("web", "api", 8080), ("api", "db", 5432)}
LOCAL = {"lapi": "api", "ldb": "db"}  # containers on Docker's default bridge -> role

T = TypeVar("T")


def _each(bed: Bed, fn: Callable[[BedHost], T]) -> list[T]:
    with ThreadPoolExecutor(len(bed.hosts)) as pool:
        return list(pool.map(fn, bed.hosts))


@dataclass
class Shop:
    bed: Bed
    stack: Stack
    agents: dict[int, BedAgent]
    addr: dict[str, str]  # role -> its mesh address
    keys: dict[str, str]  # role -> pairing key

    def host(self, role: str) -> BedHost:
        return self.bed.host(ROLES[role])

    def matrix(self) -> dict[tuple[str, str, int], bool]:
        """Every ordered pair of tiers, both ports: True = connected."""

        def one(src: str) -> dict[tuple[str, str, int], bool]:
            targets = [(self.addr[d], p) for d in ROLES if d != src for p in PORTS]
            got = self.host(src).probe(src, targets, wait=2)
            by_addr = {a: r for r, a in self.addr.items()}
            return {(src, by_addr[ip], port): ok for (ip, port), ok in got.items()}

        out: dict[tuple[str, str, int], bool] = {}
        with ThreadPoolExecutor(len(ROLES)) as pool:
            for part in pool.map(one, ROLES):
                out.update(part)
        return out


EXPECTED = {(s, d, p): (s, d, p) in ALLOWED for s in ROLES for d in ROLES if s != d for p in PORTS}


def mesh_applied(agent: BedAgent, peers: int) -> bool:
    return any(
        e.get("event") == "mesh.applied" and int(e.get("peers", -1)) >= peers for e in agent.logs()
    )


@pytest.fixture(scope="module")
def shop(bed: Bed) -> Iterator[Shop]:
    with tempfile.TemporaryDirectory(prefix="segd-fleet-") as tmp:
        root = Path(tmp)
        stack = Stack(root, listen_host=bed.root_address)
        agents: dict[int, BedAgent] = {}
        try:
            stack.start_server(SERVER_CONFIG)
            stack.rule({"role": "api"}, {"role": "web"}, "tcp/8080")
            stack.rule({"role": "db"}, {"role": "api"}, "tcp/5432")
            keys = {role: stack.key({"role": role}) for role in ROLES}

            def start(h: BedHost) -> BedAgent:
                code = stack.api("POST", "/v1/activation-codes", {})["code"]
                return h.start_agent(
                    stack.url,
                    code,
                    workdir=root / h.name,
                    options={"reconcile_interval_s": 2.0, "backoff_max_s": 2.0},
                    mesh={"enabled": True, "wireguard": "userspace"},
                )

            for h, a in zip(bed.hosts, _each(bed, start), strict=True):
                agents[h.index] = a
            for a in agents.values():
                a.wait_for(functools.partial(mesh_applied, a, 0), 30, "the mesh applied")

            addr: dict[str, str] = {}
            for role, i in ROLES.items():
                h = bed.host(i)
                h.docker(
                    "run", "-d", "--name", role, "--network", "segd",
                    "--label", f"segd.pairing-key={keys[role]}", IMAGE, "sh", "-c", SERVE,
                )  # fmt: skip
                addr[role] = h.docker(
                    "inspect", "-f", "{{.NetworkSettings.Networks.segd.IPAddress}}", role
                )
            s = Shop(bed, stack, agents, addr, keys)
            wait_for(lambda: s.matrix() == EXPECTED, 60, "the shop matrix", interval=0.5)
            yield s
        finally:
            for h in bed.hosts:
                for name in [*ROLES, *LOCAL, *(f"{r}1" for r in ROLES)]:
                    h.docker("rm", "-f", name, check=False)
            for a in agents.values():
                a.stop()
            stack.close()


def test_the_shop_spread_over_three_hosts_matches_the_policy(shop: Shop) -> None:
    """Every ordered pair of tiers, two ports, across hosts, through the mesh."""
    assert shop.matrix() == EXPECTED
    hosts = {h["hostname"]: h for h in shop.stack.api("GET", "/v1/hosts")}
    assert all(h["mesh"] == "up" and h["subnet"] for h in hosts.values()), hosts
    # Each container's address is inside its own host's subnet.
    for role, i in ROLES.items():
        subnet = hosts[shop.bed.host(i).name]["subnet"]
        assert shop.addr[role].rsplit(".", 1)[0] == subnet.rsplit(".", 1)[0], (role, subnet)


def _run(h: BedHost, name: str, key: str, network: str = "segd") -> str:
    h.docker(
        "run", "-d", "--name", name, "--network", network,
        "--label", f"segd.pairing-key={key}", IMAGE, "sh", "-c", SERVE,
    )  # fmt: skip
    fmt = f"{{{{.NetworkSettings.Networks.{network}.IPAddress}}}}"
    return h.docker("inspect", "-f", fmt, name)


def _matrix(h: BedHost, addr: dict[str, str]) -> dict[tuple[str, str, int], bool]:
    """Every ordered pair of the named containers on host h, both ports."""
    out = {}
    for src in addr:
        got = h.probe(src, [(addr[d], p) for d in addr if d != src for p in PORTS], wait=2)
        by_addr = {a: n for n, a in addr.items()}
        out.update({(src, by_addr[ip], port): ok for (ip, port), ok in got.items()})
    return out


def test_all_three_tiers_on_one_host_match_the_policy_too(shop: Shop) -> None:
    h1 = shop.bed.host(1)
    addr = {f"{r}1": _run(h1, f"{r}1", shop.keys[r]) for r in ROLES}
    want = {(f"{s}1", f"{d}1", p): ok for (s, d, p), ok in EXPECTED.items()}
    wait_for(lambda: _matrix(h1, addr) == want, 30, "the one-host matrix", interval=0.5)
    assert shop.matrix() == EXPECTED  # the spread shop is as it was


def test_default_bridge_containers_with_the_same_addresses_pair_on_every_host(
    shop: Shop,
) -> None:
    """Docker's default bridge is 172.17.0.0/16 on every host: api and db there get
    the same addresses on each host, pair (no `ip_in_use`) and enforce on their own."""
    addrs = {h.index: {n: _run(h, n, shop.keys[r], "bridge") for n, r in LOCAL.items()}
             for h in shop.bed.hosts}  # fmt: skip
    assert len({json.dumps(a, sort_keys=True) for a in addrs.values()}) == 1, addrs
    want = {
        (s, d, p): (LOCAL[s], LOCAL[d], p) in ALLOWED for s in LOCAL for d in LOCAL if s != d
        for p in PORTS
    }  # fmt: skip
    for h in shop.bed.hosts:
        wait_for(lambda h=h: _matrix(h, addrs[h.index]) == want, 30, f"{h.name}'s pair")
    paired = [w for w in shop.stack.workloads() if w["ips"] and w["ips"][0].startswith("172.17.")]
    assert len(paired) == 2 * BED_HOSTS, paired
    assert shop.matrix() == EXPECTED


def _wg_tx(h: BedHost) -> int:
    link = json.loads(h.run("ip", "-j", "-s", "link", "show", "segd-wg").stdout)
    return int(link[0]["stats64"]["tx"]["packets"])


def test_a_container_cannot_send_as_a_workload_of_another_host(shop: Shop) -> None:
    """api (host 2, Docker's default CAP_NET_RAW) sends raw frames as web's address
    (host 1): host 2 drops them before they reach the mesh (two layers: the gate binds
    every source to its bridge port, and the mesh table takes a pool source from the
    local bridge only when it is the host's own subnet); the same frames with api's
    own address do leave through the mesh. The gate alone is pinned by
    tests/kernel/test_firewall_gate.py (an address outside every local subnet)."""
    h2 = shop.host("api")
    sandbox = h2.docker("inspect", "-f", "{{.NetworkSettings.SandboxKey}}", "api")
    bridge = json.loads(h2.docker("network", "inspect", "segd"))[0]
    gateway = bridge["IPAM"]["Config"][0]["Gateway"]
    neigh = h2.run("nsenter", f"--net={sandbox}", "ip", "neigh", "show", gateway).stdout.split()
    if "lladdr" not in neigh:
        h2.run("nsenter", f"--net={sandbox}", "busybox", "ping", "-c", "1", "-W", "1", gateway)
        neigh = h2.run("nsenter", f"--net={sandbox}", "ip", "neigh", "show", gateway).stdout.split()
    mac = neigh[neigh.index("lladdr") + 1]

    def flood(src: str) -> int:
        before = _wg_tx(h2)
        args = ("eth0", mac, src, shop.addr["db"], "9000", "0.3")
        out = h2.run("nsenter", f"--net={sandbox}", sys.executable, "-c", _RAW, *args)
        assert int(out.stdout) > 100
        return _wg_tx(h2) - before

    assert flood(shop.addr["web"]) < 5
    assert flood(shop.addr["api"]) > 100


def test_an_agent_killed_keeps_the_mesh_up_and_its_containers_reachable(shop: Shop) -> None:
    a2 = shop.agents[2]
    assert a2.kill() == -9
    assert shop.matrix() == EXPECTED
    a2.start()
    a2.wait_for(lambda: a2.count("mesh.applied") > 0, 30, "the mesh applied again")
    assert shop.matrix() == EXPECTED


def test_with_the_server_down_traffic_keeps_flowing_on_the_last_instructions(
    shop: Shop,
) -> None:
    assert shop.stack.server is not None
    shop.stack.server.stop()
    try:
        assert shop.matrix() == EXPECTED
        a1 = shop.agents[1]
        a1.stop()
        a1.start(wait=False)  # restarted with the server away: the last instructions
        a1.wait_for(lambda: a1.count("instructions.loaded") > 0, 30, "instructions loaded")
        assert shop.matrix() == EXPECTED
    finally:
        shop.stack.start_server(SERVER_CONFIG)  # same port and data


def test_a_revoked_host_is_cut_off_from_the_others(shop: Shop) -> None:
    h3 = next(h for h in shop.stack.api("GET", "/v1/hosts") if h["hostname"] == "segd-bed-h3")
    target = (shop.addr["db"], 5432)
    assert shop.host("api").probe("api", [target], wait=2)[target]
    t0 = time.monotonic()
    shop.stack.api("POST", f"/v1/hosts/{h3['id']}/revoke")
    wait_for(
        lambda: not shop.host("api").probe("api", [target], wait=1)[target], 10, "host 3 cut off"
    )
    print(f"host 3 cut off after {time.monotonic() - t0:.2f} s")
    assert shop.host("web").probe("web", [(shop.addr["api"], 8080)], wait=2)[
        (shop.addr["api"], 8080)
    ]


def test_turning_the_mesh_off_removes_what_segd_added(shop: Shop) -> None:
    """Last: host 3's agent restarted with `enabled = false` takes away its accept in
    DOCKER-USER, its mesh table, the interface and the pool's route."""
    h3, a3 = shop.bed.host(3), shop.agents[3]

    def traces() -> list[str]:
        out = []
        if "segd-mesh" in h3.run("iptables", "-w", "-S", "DOCKER-USER").stdout:
            out.append("DOCKER-USER")
        if "segd_mesh" in h3.run("nft", "list", "tables").stdout:
            out.append("table")
        if h3.run("ip", "link", "show", "segd-wg", check=False).returncode == 0:
            out.append("interface")
        if f"unreachable {POOL}" in h3.run("ip", "route", "show").stdout:
            out.append("route")
        return out

    assert traces() == ["DOCKER-USER", "table", "interface", "route"]
    a3.stop()
    a3.config.write_text(a3.config.read_text().replace("enabled = true", "enabled = false"))
    a3.start()
    a3.wait_for(lambda: a3.count("mesh.removed") > 0, 30, "the mesh removed")
    assert traces() == []
    assert not shop.host("api").probe("api", [(shop.addr["db"], 5432)], wait=2)[
        (shop.addr["db"], 5432)
    ]
