"""Soak: container churn with pairings, unpairings and policy edits on one host.

Afterwards nothing may be left behind: no tasks, file descriptors or namespace
handles in the agent, no tables or set elements in the kernel, and memory flat.
The default run churns briefly; `make test-long` runs the long form.
"""

from __future__ import annotations

import random
import re
import subprocess
import time
from typing import Any

import pytest

from tests.e2e.stack import Stack, docker, wait_for

pytestmark = pytest.mark.docker

_IP = re.compile(r"\b\d+\.\d+\.\d+\.\d+\b")


def _stats(stack: Stack) -> list[dict[str, Any]]:
    assert stack.agent is not None
    return [e for e in stack.agent.logs() if e.get("event") == "agent.stats"]


def _next_stats(stack: Stack) -> dict[str, Any]:
    n = len(_stats(stack))
    wait_for(lambda: len(_stats(stack)) > n, 15, "agent stats")
    return _stats(stack)[-1]


def _table_ips(cid: str) -> set[str]:
    pid = docker("inspect", "-f", "{{.State.Pid}}", cid)
    out = subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "nft", "list", "table", "inet", "segd"],
        capture_output=True,
        text=True,
    ).stdout
    return set(_IP.findall(out)) - {"127.0.0.1"}


def _churn(stack: Stack, seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    keys = {role: stack.key({"role": role}, max_uses=10_000) for role in ("web", "db", "cache")}
    live: list[str] = []
    extra_rules: list[str] = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        op = rng.random()
        if op < 0.45 or len(live) < 3:
            role = rng.choice(list(keys))
            live.append(stack.run(f"c{i}", key=keys[role]))
        elif op < 0.85:
            stack.rm(live.pop(rng.randrange(len(live))))
        elif op < 0.93 or not extra_rules:
            extra_rules.append(
                stack.rule(
                    {"role": "cache"},
                    {"role": rng.choice(["web", "db"])},
                    f"tcp/{rng.randrange(6000, 7000)}",
                )
            )
        else:
            stack.api("DELETE", f"/v1/rules/{extra_rules.pop(rng.randrange(len(extra_rules)))}")
        if len(live) > 8:
            stack.rm(live.pop(0))
    # Every set element in every live table belongs to a live workload.
    stack.wait_paired(*live, timeout=30)
    time.sleep(1.0)
    live_ips = {stack.ip(c) for c in live}
    for c in live:
        stray = _table_ips(c) - live_ips
        assert not stray, f"{c[:12]} still lists {stray}"
    for c in live:
        stack.rm(c)


def _soak(stack: Stack, seconds: float) -> None:
    stack.start_server()
    stack.rule({"role": "db"}, {"role": "web"}, "tcp/5432")
    stack.start_agent(interval=1.0)
    _churn(stack, 8, seed=1)  # warm up: everything lazily made is made
    wait_for(lambda: not stack.workloads(), 20, "all workloads gone after warm-up")
    base = _next_stats(stack)
    _churn(stack, seconds, seed=2)
    wait_for(lambda: not stack.workloads(), 30, "all workloads gone")
    wait_for(lambda: _next_stats(stack)["containers"] == 0, 30, "agent to forget containers")
    # Idle keep-alive connections to the server and Docker close by themselves;
    # a leak never settles.
    settled = wait_for(
        lambda: (e := _next_stats(stack))["fds"] <= base["fds"] + 2 and e, 40, "fds to settle"
    )
    end = _next_stats(stack)
    assert end["namespaces"] == 0 and end["enforced"] == 0 and end["pairing"] == 0, end
    assert end["tasks"] <= base["tasks"], (base, end)
    assert settled["fds"] <= base["fds"] + 2, (base, settled)
    assert end["rss_kb"] - base["rss_kb"] < 20_000, (base, end)
    gate = subprocess.run(
        ["nft", "list", "table", "bridge", "segd_gate"], capture_output=True, text=True, check=True
    ).stdout
    assert "elements" not in gate.split("set subnets4")[0], gate
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "segd" not in tables.replace("bridge segd_gate", "")


def test_soak_short(stack: Stack) -> None:
    _soak(stack, 20)


@pytest.mark.slow
def test_soak_long(stack: Stack) -> None:
    _soak(stack, 240)
