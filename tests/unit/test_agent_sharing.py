"""One namespace, one owner: `sharing.assign` table-tested, and how Docker's
inspect output feeds it."""

from __future__ import annotations

from typing import Any

import pytest

from segd.agent.docker import parse_container
from segd.agent.sharing import HOST, OWNER, UNKNOWN, NsId, Role, Seen, assign, joined

HOST_NS: NsId = (4, 4026531833)
INIT_NS: NsId = (4, 4026531800)  # init's, when the agent is not in it
A_NS: NsId = (4, 4026532181)
B_NS: NsId = (4, 4026532258)
HOSTS = frozenset({HOST_NS, INIT_NS})


def own(cid: str, ns: NsId | None) -> Seen:
    return Seen(id=cid, joins="", host_mode=False, ns=ns)


def joins(cid: str, target: str, ns: NsId | None) -> Seen:
    return Seen(id=cid, joins=target, host_mode=False, ns=ns)


def host(cid: str, ns: NsId | None) -> Seen:
    return Seen(id=cid, joins="", host_mode=True, ns=ns)


CASES: dict[str, tuple[list[Seen], dict[str, Role]]] = {
    "alone": ([own("x", A_NS)], {"x": OWNER}),
    "two containers, two namespaces": (
        [own("x", A_NS), own("y", B_NS)],
        {"x": OWNER, "y": OWNER},
    ),
    "a sidecar shares its main's namespace": (
        [own("x", A_NS), joins("s", "x", A_NS)],
        {"x": OWNER, "s": Role("shares", "x")},
    ),
    "sidecars are seen before their main": (
        [joins("s", "x", A_NS), joins("t", "x", A_NS), own("x", A_NS)],
        {"x": OWNER, "s": Role("shares", "x"), "t": Role("shares", "x")},
    ),
    "the main is not seen yet: the sidecar still owns nothing": (
        [joins("s", "x", A_NS)],
        {"s": Role("shares", "x")},
    ),
    # Docker leaves a sidecar in the main's old namespace when the main restarts.
    "the main restarted into a new namespace": (
        [own("x", B_NS), joins("s", "x", A_NS)],
        {"x": OWNER, "s": Role("shares", "x")},
    ),
    "identity wins over the name in NetworkMode": (
        [own("x", A_NS), own("y", B_NS), joins("s", "x", B_NS)],
        {"x": OWNER, "y": OWNER, "s": Role("shares", "y")},
    ),
    "host-networked": ([host("h", HOST_NS)], {"h": HOST}),
    "host-networked, identity unreadable": ([host("h", None)], {"h": HOST}),
    "a sidecar of a host-networked container": (
        [host("h", HOST_NS), joins("s", "h", HOST_NS)],
        {"h": HOST, "s": HOST},
    ),
    "a sidecar of a host-networked container seen before it": (
        [joins("s", "h", HOST_NS)],
        {"s": HOST},
    ),
    "a host-networked container in a namespace that is not the agent's": (
        [host("h", B_NS), joins("s", "h", B_NS)],
        {"h": HOST, "s": HOST},
    ),
    "init's namespace is the host's too": ([own("x", INIT_NS)], {"x": HOST}),
    # Its pid was reused by a host process: NetworkMode says nothing of it.
    "a bridged container whose path leads to the host": (
        [own("x", HOST_NS), own("y", A_NS)],
        {"x": HOST, "y": OWNER},
    ),
    "namespace unreadable": (
        [own("x", None), joins("s", "x", None)],
        {"x": UNKNOWN, "s": UNKNOWN},
    ),
    # A stale pid now in another container's namespace: which one is real is unknown.
    "two makers in one namespace": (
        [own("x", A_NS), own("y", A_NS), joins("s", "x", A_NS)],
        {"x": UNKNOWN, "y": UNKNOWN, "s": Role("shares", "x")},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_assign(name: str) -> None:
    seen, want = CASES[name]
    assert assign(seen, HOSTS) == want
    assert assign(list(reversed(seen)), HOSTS) == want, "order must not matter"


def test_no_container_is_ever_an_owner_in_a_host_namespace() -> None:
    every = [host("h", None), host("hb", B_NS)]
    for i, ns in enumerate((HOST_NS, INIT_NS, B_NS, None, A_NS)):
        every += [own(f"o{i}", ns), joins(f"j{i}", f"o{i}", ns)]
    roles = assign(every, HOSTS)
    assert {s.id for s in every if roles[s.id] == OWNER} == {"o4"}
    assert {s.id for s in every if roles[s.id] == HOST} == {
        "h",
        "hb",
        "o0",
        "j0",
        "o1",
        "j1",
        "o2",
        "j2",
    }


@pytest.mark.parametrize(
    ("mode", "target"),
    [
        ("container:3f4e", "3f4e"),
        ("container:", ""),
        ("bridge", ""),
        ("host", ""),
        ("", ""),
        ("default", ""),
        ("none", ""),
        ("shop_default", ""),
        ("ns:/run/netns/x", ""),
    ],
)
def test_joined(mode: str, target: str) -> None:
    assert joined(mode) == target


def _inspect(mode: str, networks: dict[str, Any]) -> dict[str, Any]:
    return {
        "Id": "f" * 64,
        "Name": "/side",
        "State": {"Running": True, "Pid": 7954},
        "Config": {"Labels": {}},
        "HostConfig": {"NetworkMode": mode},
        "NetworkSettings": {"Networks": networks},
    }


def test_parse_a_sidecar_as_docker_reports_it() -> None:
    main = "27b50f9e6a84f178ff720ea6b0661fa79dab4aed11c483fc279c465a47ef3264"
    c = parse_container(_inspect(f"container:{main}", {}))
    assert c is not None
    assert c.joins == main and c.network_mode == f"container:{main}"
    assert c.ips == [] and not c.host_network  # no addresses of its own


def test_parse_a_bridged_container_joins_nothing() -> None:
    c = parse_container(_inspect("default", {"bridge": {"IPAddress": "172.17.0.2"}}))
    assert c is not None and c.joins == "" and c.ips == ["172.17.0.2"]
