"""What the agent reports, and enforcement modes, on the real stack: real Docker,
real nftables, real packets. Flow batches are read off the wire between the
agent and the server (`FlowTap`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from segd import wire
from tests.e2e.flowtap import FlowTap
from tests.e2e.stack import Stack, docker, free_port, wait_for

pytestmark = pytest.mark.docker

INTERVAL = 15  # the shortest flow interval: a record is due within two
DUE = 2 * INTERVAL + 10


def profile(stack: Stack, labels: dict[str, str]) -> tuple[str, str]:
    """A pairing profile and a key for it: (profile name, key token)."""
    name = "p-" + uuid.uuid4().hex[:8]
    stack.api("POST", "/v1/profiles", wire.ProfileIn(name=name, labels=labels))
    return name, str(stack.api("POST", "/v1/keys", wire.KeyIssueIn(profile=name))["token"])


def workload_ids(stack: Stack) -> dict[str, str]:
    return {w["container_id"]: w["id"] for w in stack.workloads()}


def scrape(listen: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def pid(cid: str) -> str:
    return docker("inspect", "-f", "{{.State.Pid}}", cid)


_ALL_NETNS = Path("/proc/sys/net/netfilter/nf_log_all_netns")


@pytest.fixture
def kernel_log_initial_netns_only() -> Iterator[None]:
    """`nf_log_all_netns=0` (the kernel default): kernel-log `log` statements
    print nothing from a container's namespace; restored afterwards."""
    before = _ALL_NETNS.read_text().strip() if _ALL_NETNS.exists() else "0"
    if before != "0":
        _ALL_NETNS.write_text("0\n")
    try:
        yield
    finally:
        if before != "0":
            _ALL_NETNS.write_text(before + "\n")


def flows(stack: Stack, *filters: str) -> list[dict[str, Any]]:
    """What the admin sees: `segd ctl flow list FILTERS --json`."""
    return list(json.loads(stack.ctl("flow", "list", *filters, "--json")))


def ends(f: dict[str, Any]) -> tuple[str, str]:
    return f["src"].get("workload_id", ""), f["dst"].get("workload_id", "")


def listed(
    stack: Stack, filters: tuple[str, ...], pred: Callable[[dict[str, Any]], bool], by: float
) -> dict[str, Any]:
    """The first flow `segd ctl flow list FILTERS` lists that `pred` accepts,
    waiting until the monotonic time `by`."""
    while True:
        hits = [f for f in flows(stack, *filters) if pred(f)]
        if hits:
            return hits[0]
        if time.monotonic() > by:
            raise AssertionError(f"segd ctl flow list {filters}: none matching: {flows(stack)}")
        time.sleep(0.5)


def test_blocked_attempts_and_logged_accepts_are_reported_by_the_agent(
    stack: Stack, kernel_log_initial_netns_only: None
) -> None:
    """An unpaired intruder's attempt on db is a blocked record from a container
    with no workload; the rule option `log` makes web -> db an allowed record
    with the rule id (its NFLOG reaches the agent from the containers'
    namespaces, `nf_log_all_netns=0`). Both reach `segd ctl flow list`. The
    agent's metrics are scraped and parsed."""
    stack.start_server()
    rule_id = stack.api(
        "POST",
        "/v1/rules",
        wire.RuleIn(
            providers=[{"role": "db"}],
            consumers=[{"role": "web"}],
            services=["tcp/5432"],
            options=["log"],
        ),
    )["id"]
    listen = f"127.0.0.1:{free_port()}"
    with FlowTap(stack.url) as tap:
        stack.start_agent(
            server=tap.url,
            extra=f'flow_interval_s = {INTERVAL}\nmetrics_listen = "{listen}"\n',
        )
        web = stack.run("web", key=stack.key({"role": "web"}))
        db = stack.run("db", key=stack.key({"role": "db"}))
        stack.wait_paired(web, db)
        intruder = stack.run("intruder")
        db_ip = stack.ip(db)
        assert stack.probe_many(web, [(db_ip, 5432)]) == {(db_ip, 5432): True}
        assert stack.probe_many(intruder, [(db_ip, 5432)]) == {(db_ip, 5432): False}
        ids = workload_ids(stack)

        allowed = tap.wait(
            lambda r: r.container_id == db and r.verdict == "allowed",
            DUE,
            "allowed into db",
        )
        assert (allowed.direction, allowed.port, allowed.proto) == ("in", 5432, "tcp")
        assert (allowed.rule_id, allowed.workload_id) == (rule_id, ids[db])
        assert (allowed.peer_ip, allowed.peer_workload_id) == (stack.ip(web), ids[web])
        assert allowed.connections >= 1

        blocked = tap.wait(
            lambda r: r.container_id == intruder and r.verdict == "blocked" and r.port == 5432,
            DUE,
            "blocked from the intruder",
        )
        assert (blocked.direction, blocked.peer_ip, blocked.workload_id) == ("out", db_ip, "")
        assert blocked.peer_workload_id == ids[db]
        assert tap.lost() == 0

        # what the admin sees: web -> db allowed under the rule, both ends
        # workloads; the intruder's attempt blocked from an unpaired container
        by = time.monotonic() + DUE
        f = listed(stack, ("--rule", rule_id), lambda f: f["verdict"] == "allowed", by)
        assert (ends(f), f["port"], f["proto"]) == ((ids[web], ids[db]), 5432, "tcp")
        f = listed(
            stack,
            ("--verdict", "blocked", "--port", "5432"),
            lambda f: f["src"]["kind"] == "unpaired",
            by,
        )
        assert f["src"]["container_id"] == intruder
        assert f["dst"]["workload_id"] == ids[db]

        m = scrape(listen)
        assert m[("segd_agent_containers", (("state", "workload"),))] == 2
        assert m[("segd_agent_containers", (("state", "isolated"),))] == 1
        assert m[("segd_agent_gate_entries", ())] == 2
        assert m[("segd_agent_log_readers", ())] == 4  # three containers and the gate
        assert m[("segd_agent_policy_drops_total", (("direction", "out"),))] >= 1
        assert m[("segd_agent_flow_records_sent_total", ())] >= 2
        assert m[("segd_agent_flow_records_lost_total", ())] == 0
        assert m[("segd_agent_ruleset_apply_seconds_count", ())] >= 3
        assert m[("segd_agent_docker_events_total", (("event", "ContainerStarted"),))] >= 3


def test_enhanced_counts_the_bytes_of_whole_connections(stack: Stack) -> None:
    """db at visibility `enhanced`: web downloads 300 KiB from db's port 5432; the
    allowed record of db's side carries the rule id and at least those bytes
    (conntrack counts both directions of the connection, in db's namespace);
    web at the default level reports nothing of it."""
    stack.start_server()
    require_modes(stack)
    rule_id = stack.api(
        "POST",
        "/v1/rules",
        wire.RuleIn(providers=[{"role": "db"}], consumers=[{"role": "web"}], services=["tcp/5432"]),
    )["id"]
    db_profile, db_key = profile(stack, {"role": "db"})
    set_mode(stack, db_profile, "full", "--visibility", "enhanced")
    with FlowTap(stack.url) as tap:
        stack.start_agent(server=tap.url, extra=f"flow_interval_s = {INTERVAL}\n")
        web = stack.run("web", key=stack.key({"role": "web"}))
        db = stack.run("db", key=db_key)
        stack.wait_paired(web, db)
        docker("exec", db, "dd", "if=/dev/zero", "of=/www/big", "bs=1024", "count=300")
        db_ip = stack.ip(db)
        docker("exec", web, "wget", "-q", "-O", "/dev/null", f"http://{db_ip}:5432/big")
        got = tap.wait(
            lambda r: r.container_id == db and r.verdict == "allowed" and r.bytes >= 300 * 1024,
            DUE,
            "db's counted download",
        )
        assert (got.direction, got.peer_ip, got.port, got.rule_id) == (
            "in",
            stack.ip(web),
            5432,
            rule_id,
        )
        assert got.packets > 1  # the whole connection's, not its logged first packet's
        assert not any(r.container_id == web and r.port == 5432 for r in tap.records())
        assert tap.lost() == 0


def set_mode(stack: Stack, name: str, mode: wire.Mode, *more: str) -> None:
    """`segd ctl profile set-mode NAME MODE [MORE]`."""
    out = stack.ctl("profile", "set-mode", name, mode, *more)
    assert out.startswith(f"profile {name}: mode {mode}"), out


def require_modes(stack: Stack) -> None:
    """The server half of enforcement modes (profile modes compiled into the
    instructions) is a separate part of segd; without it there is nothing to switch."""
    paths = stack.api("GET", "/v1/openapi.json")["paths"]
    if "/v1/profiles/{name}/mode" not in paths:
        pytest.skip("this server build has no enforcement modes (PUT /v1/profiles/{name}/mode)")


def isolated_everywhere(stack: Stack, outsiders: list[str], targets: list[str]) -> None:
    """No outsider reaches any target, nor any target an outsider."""
    for src in outsiders:
        got = stack.probe_many(src, [(stack.ip(t), p) for t in targets for p in (5432, 80)])
        assert not any(got.values()), got
    for src in targets:
        got = stack.probe_many(src, [(stack.ip(o), p) for o in outsiders for p in (5432, 80)])
        assert not any(got.values()), got


def explained(stack: Stack, src: str, dst: str, port: str) -> tuple[str, str]:
    """(verdict, reason) of `segd ctl explain SRC DST PORT --json`."""
    said = json.loads(stack.ctl("explain", src, dst, port, "--json"))
    return said["verdict"], said["reason"]


def explain_agrees(stack: Stack, names: dict[str, str]) -> None:
    """Every cell of the probe matrix of `names` (name -> container) on both
    served ports: `explain` says it passes (allowed or potentially blocked)
    exactly when the probe connected."""
    by_name = {n: docker("inspect", "-f", "{{.Name}}", c).lstrip("/") for n, c in names.items()}
    wrong = {}
    for (src, dst, port), connected in stack.matrix(names, (5432, 80)).items():
        query = urllib.parse.urlencode({"src": by_name[src], "dst": by_name[dst], "port": port})
        said = stack.api("GET", f"/v1/explain?{query}")
        if (said["verdict"] != "blocked") != connected:
            wrong[(src, dst, port)] = (connected, said["verdict"], said["reason"])
    assert not wrong, f"explain disagrees with the probes: {wrong}"


def test_visibility_mode_lets_the_blocked_probe_through_and_full_blocks_it_again(
    stack: Stack,
) -> None:
    """The acceptance loop through `segd ctl`: other -> db:5432 is blocked and
    listed as blocked (both workloads, the port) within two flow intervals;
    web -> db listed as allowed with the rule id (db's profile reports allowed
    flows too); both ends' profiles switched to `visibility`: the probe
    connects and is listed `potentially_blocked`; db alone `idle` by its own
    mode (`segd ctl workload set-mode`), then its profile's; back to `full`: blocked
    again, no container restarted. `explain` agrees with the probe matrix of
    the three in every mode.
    Unkeyed, forged and revoked containers stay isolated in every mode."""
    stack.start_server()
    require_modes(stack)
    rule_id = stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    with FlowTap(stack.url) as tap:
        stack.start_agent(server=tap.url, extra=f"flow_interval_s = {INTERVAL}\n")
        db_profile, db_key = profile(stack, {"role": "db"})
        other_profile, other_key = profile(stack, {"role": "other"})
        set_mode(stack, db_profile, "full", "--visibility", "blocked+allowed")
        web = stack.run("web", key=stack.key({"role": "web"}))
        db = stack.run("db", key=db_key)
        other = stack.run("other", key=other_key)
        stack.wait_paired(web, db, other)
        revoked = stack.key({"role": "db"})
        key_id = stack.api("GET", "/v1/keys")[-1]["key_id"]
        stack.api("POST", f"/v1/keys/{key_id}/revoke")
        outsiders = [
            stack.run("nokey"),
            stack.run(
                "forged", key=db_key[:-4] + ("AAAA" if not db_key.endswith("AAAA") else "BBBB")
            ),
            stack.run("revoked", key=revoked),
        ]
        assert stack.agent is not None
        wait_for(lambda: stack.agent.count("pairing.denied") >= 2, 15, "two denials")
        db_ip, pids = stack.ip(db), {c: pid(c) for c in (web, db, other)}
        ids = workload_ids(stack)
        names = {c: docker("inspect", "-f", "{{.Name}}", c).lstrip("/") for c in (web, db, other)}

        def probe() -> bool:
            return stack.probe_many(other, [(db_ip, 5432)])[(db_ip, 5432)]

        def other_to_db(verdict: str) -> Callable[[dict[str, Any]], bool]:
            return lambda f: f["verdict"] == verdict and ends(f) == (ids[other], ids[db])

        # full: blocked, and listed as blocked within two intervals of the probe
        by = time.monotonic() + 2 * INTERVAL
        assert not probe()
        assert stack.probe_many(web, [(db_ip, 5432)]) == {(db_ip, 5432): True}
        f = listed(stack, ("--verdict", "blocked", "--port", "5432"), other_to_db("blocked"), by)
        assert (f["port"], f["proto"], f["rule_id"]) == (5432, "tcp", "")
        f = listed(stack, ("--verdict", "allowed", "--dst", "role=db"), lambda _f: True, by)
        assert (ends(f), f["port"], f["rule_id"]) == ((ids[web], ids[db]), 5432, rule_id)
        assert explained(stack, names[other], names[db], "5432/tcp") == ("blocked", "no_rule")
        assert explained(stack, names[web], names[db], "5432/tcp") == ("allowed", "rule")
        # other's own table reported it: it never left other
        r = tap.wait(
            lambda r: r.container_id == other and r.verdict == "blocked" and r.port == 5432,
            DUE,
            "other -> db blocked",
        )
        assert (r.direction, r.peer_ip) == ("out", db_ip)
        assert (r.workload_id, r.peer_workload_id) == (ids[other], ids[db])
        isolated_everywhere(stack, outsiders, [web, db, other])
        shop = {"web": web, "db": db, "other": other}
        explain_agrees(stack, shop)

        # visibility on both ends: the same probe connects, reported potentially
        # blocked by both tables (each would have dropped it)
        for name in (db_profile, other_profile):
            set_mode(stack, name, "visibility")
        wait_for(probe, 15, "other -> db to connect in visibility mode", interval=0.5)
        by = time.monotonic() + 2 * INTERVAL
        listed(stack, ("--verdict", "potentially_blocked"), other_to_db("potentially_blocked"), by)
        assert explained(stack, names[other], names[db], "5432/tcp") == (
            "potentially_blocked",
            "mode_visibility",
        )
        for cid, direction, peer in ((other, "out", db), (db, "in", other)):
            r = tap.wait(
                potentially_blocked(cid), DUE, f"other -> db potentially blocked, {direction}"
            )
            assert (r.direction, r.peer_workload_id) == (direction, ids[peer])
        isolated_everywhere(stack, outsiders, [web, db, other])
        explain_agrees(stack, shop)

        # idle, db's own mode: no table, still paired; outsiders still out
        out = stack.ctl("workload", "set-mode", ids[db], "idle")
        assert out.startswith(f"workload {ids[db]}: mode idle (its own)"), out
        wait_for(lambda: _table(db) is None, 15, "db's table gone in idle mode", interval=0.3)
        assert ids[db] in {w["id"] for w in stack.workloads()}
        isolated_everywhere(stack, outsiders, [web, db, other])
        explain_agrees(stack, shop)
        out = stack.ctl("workload", "set-mode", ids[db], "inherit")
        assert out.startswith(f"workload {ids[db]}: mode visibility (its profile's)"), out
        wait_for(lambda: _table(db) is not None, 15, "db's table back", interval=0.3)

        # back to full: blocked again, no container restarted
        for name in (db_profile, other_profile):
            set_mode(stack, name, "full")
        wait_for(lambda: not probe(), 15, "other -> db blocked again", interval=0.5)
        again, by = time.time(), time.monotonic() + 2 * INTERVAL
        assert not probe()
        listed(
            stack,
            ("--verdict", "blocked", "--port", "5432"),
            lambda f: other_to_db("blocked")(f) and f["last_seen"] >= again,
            by,
        )
        assert explained(stack, names[other], names[db], "5432/tcp") == ("blocked", "no_rule")
        isolated_everywhere(stack, outsiders, [web, db, other])
        assert stack.probe_many(web, [(db_ip, 5432)]) == {(db_ip, 5432): True}
        explain_agrees(stack, shop)
        assert {c: pid(c) for c in (web, db, other)} == pids


def potentially_blocked(cid: str) -> Callable[[wire.FlowRecordIn], bool]:
    def match(r: wire.FlowRecordIn) -> bool:
        return r.container_id == cid and r.verdict == "potentially_blocked" and r.port == 5432

    return match


def _table(cid: str) -> Any:
    p = subprocess.run(
        ["nsenter", f"--net=/proc/{pid(cid)}/ns/net", "nft", "list", "table", "inet", "segd"],
        capture_output=True,
        text=True,
    )
    return p.stdout if p.returncode == 0 else None


# Each datagram meets the flooder's own table (a local drop fails the send: EPERM).
_FLOOD = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "refused=0\n"
    "for _ in range(int(sys.argv[2])):\n"
    "    try:\n"
    "        s.sendto(b'x',(sys.argv[1],5432))\n"
    "    except OSError:\n"
    "        refused+=1\n"
    "print(refused)\n"
)


def test_a_flood_of_denied_packets_is_aggregated_and_the_agent_keeps_enforcing(
    stack: Stack,
) -> None:
    """50,000 denied datagrams from an unpaired container: a pairing started
    meanwhile still enforces, the flood comes back as one record counting the
    (rate-limited) logged packets, and nothing is lost."""
    stack.start_server()
    stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    listen = f"127.0.0.1:{free_port()}"
    with FlowTap(stack.url) as tap:
        stack.start_agent(
            server=tap.url, extra=f'flow_interval_s = {INTERVAL}\nmetrics_listen = "{listen}"\n'
        )
        db = stack.run("db", key=stack.key({"role": "db"}))
        stack.wait_paired(db)
        flooder = stack.run("flooder")
        wait_for(lambda: stack.agent is not None and _table(flooder), 15, "flooder isolated")
        db_ip = stack.ip(db)
        flood = subprocess.Popen(
            [
                *("nsenter", f"--net=/proc/{pid(flooder)}/ns/net", sys.executable, "-c"),
                *(_FLOOD, db_ip, "50000"),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            web = stack.run("web", key=stack.key({"role": "web"}))
            stack.wait_paired(web)  # the usual time, flood or not
            assert stack.probe_many(web, [(db_ip, 5432)]) == {(db_ip, 5432): True}
        finally:
            out, _ = flood.communicate(timeout=120)
        assert int(out.strip()) == 50_000  # every one dropped
        r = tap.wait(
            lambda r: r.container_id == flooder and r.proto == "udp" and r.port == 5432,
            DUE,
            "the flood's record",
        )
        assert (r.verdict, r.direction, r.peer_ip, r.workload_id) == ("blocked", "out", db_ip, "")
        assert 0 < r.packets < 50_000  # logged at a bounded rate, not per packet
        m = scrape(listen)
        assert m[("segd_agent_flow_records_lost_total", ())] == 0
        assert tap.lost() == 0
        assert m[("segd_agent_policy_drops_total", (("direction", "out"),))] >= r.packets
