"""`segd demo --hosts N`: the shop spread over N simulated hosts, segmented live.

It brings up the test bed (segd.bed: one network namespace and `dockerd` per
host), starts `segd server` on the underlay with a mesh pool and one agent per
host in the mesh, writes the one-host demo's policy, runs web, api and db on
different hosts on the `segd` network with their pairing keys and an intruder
with none, then measures every pair with real TCP connections across the
WireGuard mesh. It waits for Ctrl-C (or exits at once with --no-wait) and
removes everything: containers, agents, server and the bed.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from segd import wire
from segd.bed import Bed, BedError
from segd.bed.fleet import Fleet
from segd.bed.plan import UNDERLAY
from segd.demo import (
    PORT_OF,
    RULES,
    SERVE,
    TIERS,
    _interrupt,
    _say,
    say_matrix,
    say_policy,
    wait_for_ctrl_c,
    write_policy,
)
from segd.http.client import ClientError

MAX_HOSTS = 8
INTRUDER = "intruder"


def placement(hosts: int) -> dict[str, int]:
    """Which host (1-based) each container runs on: the tiers on hosts 1, 2, 3, …
    in turn, the intruder (no key) after them."""
    if not 2 <= hosts <= MAX_HOSTS:
        raise ValueError(f"--hosts: 1 (one host) or 2 to {MAX_HOSTS}")
    names = [*TIERS, INTRUDER]
    return {name: i % hosts + 1 for i, name in enumerate(names)}


class FleetDemo:
    def __init__(self, hosts: int) -> None:
        self.where = placement(hosts)
        self.n = hosts
        self.dir = Path(tempfile.mkdtemp(prefix="segd-demo-fleet-"))
        self.bed: Bed | None = None
        self.fleet: Fleet | None = None
        self.cids: dict[str, str] = {}
        self.ips: dict[str, str] = {}

    def up(self) -> Fleet:
        self.bed = Bed.up(self.n)
        _say(
            f"  test bed up: {self.n} hosts (segd-bed-h1..h{self.n}, a dockerd each) "
            f"on the underlay {UNDERLAY} ({self.bed.up_seconds:.1f}s)"
        )
        self.fleet = Fleet(self.bed, self.dir)
        self.fleet.start_server()
        _say(f"  segd server is up at {self.fleet.url}, mesh pool {self.fleet.pool}")
        return self.fleet

    def run(self, fleet: Fleet, keys: dict[str, str]) -> None:
        def one(name: str) -> tuple[str, str]:
            return fleet.run(
                self.where[name], f"segd-demo-{name}", keys.get(name, ""), ["sh", "-c", SERVE]
            )

        with ThreadPoolExecutor(len(self.where)) as pool:
            for name, (cid, ip) in zip(self.where, pool.map(one, self.where), strict=True):
                self.cids[name], self.ips[name] = cid, ip

    def measure(self, pairs: list[tuple[str, str]] | None = None) -> dict[tuple[str, str], bool]:
        """Whether each (source, destination) connects: `pairs`, or every pair."""
        assert self.bed is not None
        bed = self.bed

        def probe(src: str) -> dict[tuple[str, str], bool]:
            dsts = [d for d in self.cids if d != src and (pairs is None or (src, d) in pairs)]
            if not dsts:
                return {}
            targets = [(self.ips[d], PORT_OF[d]) for d in dsts]
            got = bed.host(self.where[src]).probe(self.cids[src], targets)
            return {(src, d): got[(self.ips[d], PORT_OF[d])] for d in dsts}

        out: dict[tuple[str, str], bool] = {}
        with ThreadPoolExecutor(len(self.cids)) as pool:
            for part in pool.map(probe, self.cids):
                out.update(part)
        return out

    def wait_enforced(self, fleet: Fleet, timeout: float = 90) -> None:
        want = {self.cids[n] for n in TIERS}
        deadline = time.monotonic() + timeout

        def until(pred: Callable[[], bool], what: str) -> None:
            while not pred():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
                time.sleep(0.2)

        until(lambda: want <= {w["container_id"] for w in fleet.api("GET", "/v1/workloads")},
              "the three tiers to pair")  # fmt: skip
        allowed = [(c, p) for c, p, _ in RULES]
        # Across hosts, the first packets also wait for WireGuard's handshake.
        until(lambda: all(self.measure(allowed).values()), "the allowed pairs to connect")

    def cleanup(self) -> list[str]:
        """Remove everything; what is left (empty: clean). The bed goes even when
        stopping the processes fails: its teardown finds and kills them too."""
        left: list[str] = []
        try:
            if self.fleet is not None:
                self.fleet.close()
        finally:
            if self.bed is not None:
                left = self.bed.down()
            shutil.rmtree(self.dir, ignore_errors=True)
        return left


def _hosts_table(fleet: Fleet) -> None:
    hosts = sorted(fleet.client.get(list[wire.Host], "GET", "/v1/hosts"), key=lambda h: h.hostname)
    _say("\n  hosts (one agent each, in the mesh):")
    _say(f"    {'host':<13} {'subnet':<16} {'endpoint':<19} {'WireGuard key':<14} mesh")
    for h in hosts:
        key = h.mesh_public_key[:10] + "…" if h.mesh_public_key else "-"
        _say(f"    {h.hostname:<13} {h.subnet:<16} {h.endpoint:<19} {key:<14} {h.mesh}")


def _containers_table(demo: FleetDemo, fleet: Fleet) -> None:
    workloads = {
        w.container_id: w for w in fleet.client.get(list[wire.Workload], "GET", "/v1/workloads")
    }
    _say("\n  containers (on each host's `segd` network):")
    for name, cid in demo.cids.items():
        w = workloads.get(cid)
        if w is not None:
            state = "paired  " + ",".join(f"{k}={v}" for k, v in w.labels.items())
        else:
            state = "isolated: no pairing key"
        _say(f"    {name:<9} host {demo.where[name]}  {demo.ips[name]:<13} {state}")


def _no_wireguard() -> str:
    """Why the agents could not run the mesh here ("" when they can)."""
    from segd.firewall.kernel import kernel_has_wireguard, wireguard_go
    from segd.mesh.choice import NoWireGuard, choose

    if os.geteuid() != 0:
        return "the fleet demo needs root (the test bed: namespaces, dockerd)"
    try:
        choose("auto", kernel_has_wireguard(), wireguard_go())
    except NoWireGuard as e:
        return f"{e}; run `make host`"
    return ""


def fleet_demo_main(*, hosts: int, wait: bool = True) -> int:
    try:
        demo = FleetDemo(hosts)
    except ValueError as e:
        print(f"segd demo: {e}", file=sys.stderr)
        return 2
    problem = _no_wireguard()
    if problem:
        demo.cleanup()
        print(f"segd demo: {problem}", file=sys.stderr)
        return 1
    # Also when started with SIGINT ignored (in the background of a script).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        _say(f"segd demo: the shop over {hosts} hosts, one WireGuard mesh, labels -> nftables\n")
        fleet = demo.up()
        keys = write_policy(fleet.client)
        say_policy()
        _say("  pairing keys issued for profiles shop-web, shop-api, shop-db (role and app locked)")
        t0 = time.monotonic()
        fleet.join_all()
        _say(f"  every host's agent registered and joined the mesh ({time.monotonic() - t0:.1f}s)")
        demo.run(fleet, keys)
        placed = ", ".join(f"{n} on host {i}" for n, i in demo.where.items())
        _say(f"  started {placed} (the intruder has no key)")
        t0 = time.monotonic()
        demo.wait_enforced(fleet)
        took = time.monotonic() - t0
        _say(f"  paired and enforced on every host; the allowed pairs connect ({took:.1f}s)")
        _hosts_table(fleet)
        _containers_table(demo, fleet)
        t0 = time.monotonic()
        got = demo.measure()
        how = ", across hosts through the mesh"
        wrong = say_matrix(got, list(demo.cids), how, time.monotonic() - t0)
        if wait and not wrong:
            wait_for_ctrl_c(
                f"\n  try: segd ctl --server {fleet.url} --token-file {fleet.token_file} host list",
                "       python -m segd.bed exec 2 -- docker ps",
                "  press Ctrl-C to stop and clean up",
            )
        return 1 if wrong else 0
    except (RuntimeError, ClientError, BedError) as e:
        print(f"segd demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C: the cleanup goes on
            signal.signal(sig, signal.SIG_IGN)
        _say("\n  cleaning up: containers, agents, segd server, the test bed")
        left = demo.cleanup()
        if left:
            print(f"segd demo: left behind: {'; '.join(left)}", file=sys.stderr)
