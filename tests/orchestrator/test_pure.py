"""Pure parts of the orchestrator, as tables: validation, masking, container config."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from segd.contract import requested_labels
from segd.errors import InvalidInput
from segd.orchestrator import validate, wire
from segd.orchestrator.docker import container_config
from segd.orchestrator.model import ProfileRecord
from segd.policy import DEFAULT_DIMENSIONS
from tests.orchestrator.conftest import KEY


def _profile(**over: Any) -> wire.ProfileIn:
    base: dict[str, Any] = {"name": "web", "image": "segd-busybox:latest", "pairing_key": KEY}
    base.update(over)
    return msgspec.convert(base, wire.ProfileIn)


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        (KEY, "segd1.eyJ2…(masked)"),
        ("abcdefghijklmnopqrstuvwxyz0123456789abcd", "abcdefghij…(masked)"),
        ("short-key", "sh…(masked)"),
        ("abc", "…(masked)"),
        ("", ""),
    ],
)
def test_mask(key: str, shown: str) -> None:
    assert wire.mask(key) == shown


def test_profile_record_repr_hides_the_key() -> None:
    rec = ProfileRecord("web", "img", [], {}, [], {}, KEY, "", 0.0)
    assert KEY not in repr(rec)
    assert KEY not in str(rec)
    assert KEY not in msgspec.json.encode(rec.view()).decode()


def test_profile_ok_sorts_labels() -> None:
    p = validate.profile(_profile(labels={"role": "web", "app": "shop"}), DEFAULT_DIMENSIONS)
    assert list(p.labels) == ["app", "role"]


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"name": "-web"}, "name: invalid name"),
        ({"name": "a" * 64}, "name: invalid name"),
        ({"image": ""}, "image: invalid image reference"),
        ({"image": "busybox latest"}, "image: invalid image reference"),
        ({"pairing_key": ""}, "pairing_key: must be"),
        ({"pairing_key": "has space"}, "pairing_key: must be"),
        ({"pairing_key": "x" * 4097}, "pairing_key: must be"),
        ({"command": ["a\0b"]}, "command[0]"),
        ({"env": {"1BAD": "x"}}, "env: invalid variable name"),
        ({"env": {"A": "x\0"}}, "env.A"),
        ({"networks": ["host"]}, "'host' shares the host namespace"),
        ({"networks": ["none", "bridge"]}, "'none' cannot be combined"),
        ({"networks": ["a", "a"]}, "each network at most once"),
        ({"networks": ["bad name"]}, "invalid network name"),
        ({"labels": {"colour": "red"}}, "labels: unknown label dimension 'colour'"),
        ({"labels": {"role": "we b"}}, "labels: invalid value"),
        ({"labels": {"role": ""}}, "labels: invalid value"),
        ({"description": "x\ny"}, "description: control characters"),
        ({"description": "x" * 501}, "description: longer than 500"),
    ],
)
def test_profile_refused(over: dict[str, Any], needle: str) -> None:
    with pytest.raises(InvalidInput) as e:
        validate.profile(_profile(**over), DEFAULT_DIMENSIONS)
    assert needle in e.value.message
    assert KEY not in e.value.message


def test_profile_configured_dimensions() -> None:
    p = validate.profile(_profile(labels={"tier": "a"}), ["tier"])
    assert p.labels == {"tier": "a"}
    with pytest.raises(InvalidInput, match="unknown label dimension 'role'"):
        validate.profile(_profile(labels={"role": "a"}), ["tier"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:///var/run/docker.sock", validate.Endpoint("unix", path="/var/run/docker.sock")),
        ("tcp://10.0.0.5:2376", validate.Endpoint("tcp", host="10.0.0.5", port=2376)),
        (
            "tcp://docker-1.example:2375",
            validate.Endpoint("tcp", host="docker-1.example", port=2375),
        ),
        ("tcp://[fd00::5]:2376", validate.Endpoint("tcp", host="fd00::5", port=2376)),
    ],
)
def test_endpoint_ok(text: str, expected: validate.Endpoint) -> None:
    assert validate.endpoint(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unix://relative.sock",
        "http://10.0.0.5:2375",
        "tcp://10.0.0.5",
        "tcp://10.0.0.5:0",
        "tcp://10.0.0.5:65536",
        "tcp://a b:1",
        "ssh://host",
    ],
)
def test_endpoint_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="endpoint: invalid"):
        validate.endpoint(text)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"name": "n", "endpoint": "unix:///s", "tls_ca": "/ca.pem"}, "only for tcp://"),
        ({"name": "n", "endpoint": "tcp://h:1", "tls_cert": "/c.pem"}, "give both or neither"),
        ({"name": "n", "endpoint": "tcp://h:1", "tls_ca": "ca.pem"}, "absolute path"),
        ({"name": "bad name", "endpoint": "tcp://h:1"}, "name: invalid name"),
    ],
)
def test_node_refused(body: dict[str, str], needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        validate.node(msgspec.convert(body, wire.NodeIn))


@pytest.mark.parametrize("count", [0, -1, validate.MAX_RUN + 1])
def test_run_count_bounds(count: int) -> None:
    """The type states the bound: decoding refuses it (400 `invalid_input`)."""
    with pytest.raises(msgspec.ValidationError, match=r"at `\$\.count`"):
        msgspec.convert({"profile": "web", "count": count}, wire.RunIn)


@pytest.mark.parametrize(
    ("over", "where"),
    [
        ({"command": ["x"] * (validate.MAX_ARGS + 1)}, "command"),
        ({"env": {f"V{i}": "x" for i in range(validate.MAX_ENV + 1)}}, "env"),
        ({"networks": [f"n{i}" for i in range(validate.MAX_NETWORKS + 1)]}, "networks"),
    ],
)
def test_profile_counts_bounded_by_the_type(over: dict[str, Any], where: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=rf"length <= \d+ - at `\$\.{where}`"):
        _profile(**over)


def test_container_config() -> None:
    rec = ProfileRecord(
        name="web",
        image="segd-busybox:latest",
        command=["sh", "-c", "exec sleep 1"],
        env={"B": "2", "A": "1"},
        networks=["front", "back"],
        labels={"app": "shop", "role": "web"},
        pairing_key=KEY,
        description="",
        created_at=0.0,
    )
    cfg = container_config(rec, {"segd.test": "orch"})
    assert cfg == {
        "Image": "segd-busybox:latest",
        "Cmd": ["sh", "-c", "exec sleep 1"],
        "Env": ["A=1", "B=2"],
        "Labels": {
            "segd.test": "orch",
            "segd.pairing-key": KEY,
            "segd.label.app": "shop",
            "segd.label.role": "web",
            "segd.orch.profile": "web",
            "segd.orch.managed": "1",
        },
        "HostConfig": {"NetworkMode": "front"},
        "NetworkingConfig": {"EndpointsConfig": {"front": {}}},
    }
    assert requested_labels(cfg["Labels"]) == {"app": "shop", "role": "web"}


def test_container_config_defaults_to_image_command_and_default_network() -> None:
    rec = ProfileRecord("web", "img", [], {}, [], {}, KEY, "", 0.0)
    cfg = container_config(rec, {})
    assert "Cmd" not in cfg
    assert "NetworkingConfig" not in cfg
    assert cfg["HostConfig"] == {}
