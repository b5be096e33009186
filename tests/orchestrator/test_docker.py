"""The orchestrator on the real Docker engine (root only).

Each test labels its containers `segd.test=orch` plus a per-test run id, checks
the engine with the docker CLI, and removes whatever is left in teardown.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from tests.orchestrator.conftest import (
    IMAGE,
    KEY,
    KEY2,
    RUN_LABEL,
    Api,
    ApiFactory,
    containers_of,
    docker,
    labels_for,
    profile_body,
)

pytestmark = pytest.mark.docker

MASKED = KEY[:10] + "…(masked)"


def exists(cid: str) -> bool:
    p = subprocess.run(["docker", "inspect", cid], capture_output=True, timeout=30)
    return p.returncode == 0


def inspect(cid: str) -> dict[str, Any]:
    [data] = json.loads(docker("inspect", cid))
    return dict(data)


@pytest.fixture
async def real(make_api: ApiFactory, run_id: str) -> Api:
    api = await make_api(container_labels=labels_for(run_id))
    for body in (
        profile_body(),
        profile_body("api", pairing_key=KEY2, labels={"role": "api", "app": "shop"}),
    ):
        status, answer = await api.call("POST", "/v1/orch/profiles", body)
        assert status == 201, answer
    return api


@pytest.fixture
def network(run_id: str) -> Iterator[str]:
    name = f"segd-orch-{run_id}"
    docker("network", "create", "--label", f"{RUN_LABEL}={run_id}", name)
    try:
        yield name
    finally:
        for cid in containers_of(run_id):
            docker("rm", "-f", cid, check=False)
        docker("network", "rm", name, check=False)


async def test_run_ps_rm(real: Api, run_id: str) -> None:
    status, started = await real.call("POST", "/v1/orch/run", {"profile": "web", "count": 2})
    assert status == 201, started
    assert len(started) == 2
    assert sorted(containers_of(run_id)) == sorted(c["id"] for c in started)
    for c in started:
        data = inspect(c["id"])
        assert data["State"]["Running"] is True
        labels = data["Config"]["Labels"]
        assert labels["segd.pairing-key"] == KEY
        assert labels["segd.label.role"] == "web"
        assert labels["segd.label.app"] == "shop"
        assert labels["segd.orch.profile"] == "web"
        assert labels["segd.orch.managed"] == "1"
        assert labels["segd.test"] == "orch"
        assert data["Config"]["Cmd"] == ["sh", "-c", "exec sleep 100000"]
        assert data["Config"]["Image"] == IMAGE
        assert c["pairing_key"] == MASKED

    status, listed = await real.call("GET", "/v1/orch/containers")
    assert status == 200
    assert {c["id"] for c in listed} == {c["id"] for c in started}
    assert {c["state"] for c in listed} == {"running"}
    assert all(c["status"].startswith("Up") for c in listed)

    status, removed = await real.call("DELETE", f"/v1/orch/containers/{started[0]['id'][:12]}")
    assert status == 200 and removed["was_gone"] is False
    assert containers_of(run_id) == [started[1]["id"]]
    status, removed = await real.call("DELETE", f"/v1/orch/containers/{started[1]['name']}")
    assert status == 200
    assert containers_of(run_id) == []
    assert (await real.call("GET", "/v1/orch/containers"))[1] == []


async def test_change_profile(real: Api, run_id: str) -> None:
    _, [old] = await real.call("POST", "/v1/orch/run", {"profile": "web"})
    status, changed = await real.call(
        "POST", f"/v1/orch/containers/{old['id']}/change", {"profile": "api"}
    )
    assert status == 200, changed
    new = changed["new"]
    assert containers_of(run_id) == [new["id"]]
    labels = inspect(new["id"])["Config"]["Labels"]
    assert labels["segd.pairing-key"] == KEY2
    assert labels["segd.label.role"] == "api"
    assert labels["segd.orch.profile"] == "api"
    assert inspect(new["id"])["State"]["Running"] is True
    assert not exists(old["id"])
    listed = (await real.call("GET", "/v1/orch/containers"))[1]
    assert [(c["id"], c["profile"]) for c in listed] == [(new["id"], "api")]


async def test_change_to_a_bad_image_leaves_the_old_container(real: Api, run_id: str) -> None:
    await real.call("POST", "/v1/orch/profiles", profile_body("ghost", image="segd-ghost:none"))
    _, [old] = await real.call("POST", "/v1/orch/run", {"profile": "web"})
    status, body = await real.call(
        "POST", f"/v1/orch/containers/{old['id']}/change", {"profile": "ghost"}
    )
    assert status == 422 and body["error"] == "image_not_found"
    assert containers_of(run_id) == [old["id"]]
    assert inspect(old["id"])["State"]["Running"] is True


async def test_bad_image_gives_a_clear_error_and_leaves_nothing(real: Api, run_id: str) -> None:
    await real.call("POST", "/v1/orch/profiles", profile_body("ghost", image="segd-ghost:none"))
    status, body = await real.call("POST", "/v1/orch/run", {"profile": "ghost", "count": 2})
    assert status == 422
    assert body["error"] == "image_not_found"
    assert "segd-ghost:none" in body["message"] and "'local'" in body["message"]
    assert containers_of(run_id) == []


async def test_bad_command_gives_a_clear_error_and_leaves_nothing(real: Api, run_id: str) -> None:
    body = profile_body("broken", command=["/no/such/binary"])
    await real.call("POST", "/v1/orch/profiles", body)
    status, answer = await real.call("POST", "/v1/orch/run", {"profile": "broken"})
    assert 400 <= status < 600 and status not in (200, 201)
    assert answer["error"] in ("docker_refused", "docker_error"), answer
    assert "no/such/binary" in answer["message"]
    assert containers_of(run_id) == []


async def test_unknown_profile_leaves_nothing(real: Api, run_id: str) -> None:
    status, body = await real.call("POST", "/v1/orch/run", {"profile": "nope"})
    assert (status, body["error"]) == (404, "not_found")
    assert body["message"] == "no container profile 'nope'"
    assert containers_of(run_id) == []


async def test_unreachable_node_leaves_nothing(real: Api, run_id: str) -> None:
    await real.call("POST", "/v1/orch/nodes", {"name": "down", "endpoint": "tcp://127.0.0.1:1"})
    status, body = await real.call("POST", "/v1/orch/run", {"profile": "web", "node": "down"})
    assert (status, body["error"]) == (503, "node_unreachable")
    assert "'down'" in body["message"] and "tcp://127.0.0.1:1" in body["message"]
    assert containers_of(run_id) == []


async def test_bad_network_leaves_nothing(real: Api, run_id: str, network: str) -> None:
    for name, nets in (("n1", ["segd-no-such-net"]), ("n2", [network, "segd-no-such-net"])):
        await real.call("POST", "/v1/orch/profiles", profile_body(name, networks=nets))
        status, body = await real.call("POST", "/v1/orch/run", {"profile": name})
        assert 400 <= status < 600 and status != 201
        assert "segd-no-such-net" in body["message"], body
        assert containers_of(run_id) == []


async def test_every_network_is_attached(real: Api, run_id: str, network: str) -> None:
    await real.call(
        "POST", "/v1/orch/profiles", profile_body("multi", networks=[network, "bridge"])
    )
    status, [c] = await real.call("POST", "/v1/orch/run", {"profile": "multi"})
    assert status == 201
    nets = inspect(c["id"])["NetworkSettings"]["Networks"]
    assert set(nets) == {network, "bridge"}
    assert inspect(c["id"])["HostConfig"]["NetworkMode"] == network


async def test_the_key_is_never_logged_nor_listed_unmasked(real: Api, run_id: str) -> None:
    texts: list[str] = []

    async def call(method: str, path: str, body: Any = None) -> Any:
        resp = await real.client.request(method, path, json=body, headers=real.auth)
        texts.append(await resp.text())
        return json.loads(texts[-1]) if texts[-1] else None

    with structlog.testing.capture_logs() as logs:
        await call("POST", "/v1/orch/profiles", profile_body("ghost", image="segd-ghost:none"))
        await call("POST", "/v1/orch/nodes", {"name": "down", "endpoint": "tcp://127.0.0.1:1"})
        [c] = await call("POST", "/v1/orch/run", {"profile": "web"})
        await call("POST", "/v1/orch/run", {"profile": "ghost"})
        await call("POST", "/v1/orch/run", {"profile": "web", "node": "down"})
        await call("GET", "/v1/orch/profiles")
        await call("GET", "/v1/orch/containers")
        changed = await call("POST", f"/v1/orch/containers/{c['id']}/change", {"profile": "web"})
        await call("GET", "/v1/orch/containers")
        await call("DELETE", f"/v1/orch/containers/{changed['new']['id']}")
    assert len(texts) == 10
    for text in texts:
        assert KEY not in text
    assert MASKED in texts[5] and MASKED in texts[6]
    assert {"container.started", "container.changed", "container.removed"} <= {
        e["event"] for e in logs
    }
    assert KEY not in repr(logs)
    assert containers_of(run_id) == []
