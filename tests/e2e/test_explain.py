"""`explain` against real packets: for every cell of the shop's probe matrix, what
`GET /v1/explain` says and what the probe saw agree."""

from __future__ import annotations

import urllib.parse

import pytest

from tests.e2e.stack import Stack, docker
from tests.e2e.test_enforcement import PORTS, _shop

pytestmark = pytest.mark.docker


def test_explain_agrees_with_the_probe_matrix(stack: Stack) -> None:
    names = _shop(stack)
    got = stack.matrix(names, PORTS)
    paired = {w["container_id"]: w for w in stack.workloads()}
    # a paired container by its name, an unpaired one by its address
    who = {
        n: docker("inspect", "-f", "{{.Name}}", cid).lstrip("/") if cid in paired else stack.ip(cid)
        for n, cid in names.items()
    }
    wrong = {}
    reasons: dict[str, int] = {}
    for (src, dst, port), connected in got.items():
        query = urllib.parse.urlencode({"src": who[src], "dst": who[dst], "port": port})
        said = stack.api("GET", f"/v1/explain?{query}")
        reasons[said["reason"]] = reasons.get(said["reason"], 0) + 1
        if (said["verdict"] == "allowed") != connected:
            wrong[(src, dst, port)] = (connected, said["verdict"], said["reason"], said["steps"])
    assert not wrong, f"explain disagrees with the probes: {wrong}"
    assert reasons.get("rule") == sum(got.values()) == 2
    assert set(reasons) <= {"rule", "no_rule", "locked_label", "src_unpaired", "dst_unpaired"}
    assert reasons["src_unpaired"] > 0 and reasons["dst_unpaired"] > 0
    # web -> db on 5432 names the rule both tables accept it under
    query = urllib.parse.urlencode({"src": who["web"], "dst": who["db"], "port": "5432/tcp"})
    said = stack.api("GET", f"/v1/explain?{query}")
    [rule] = stack.api("GET", "/v1/rules")
    assert said["rule_id"] == rule["id"]
    assert said["steps"][0].endswith(f"rule {rule['id']}")
