"""Pure parts of the agent: container inspection parsing and instruction checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import nacl.signing
import pytest

from segd import crypto
from segd.agent.client import PairAnswer
from segd.agent.docker import bridge_subnets, parse_container
from segd.agent.state import Identity, InvalidInstructions, StateDir, verify_instructions
from segd.wire import Instructions, SignedInstructions


def inspect(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "Id": "abc123" * 10,
        "Name": "/web-1",
        "State": {"Running": True, "Pid": 4242},
        "Config": {
            "Labels": {
                "segd.pairing-key": "segd1.x.y",
                "segd.label.role": "web",
                "segd.label.env": "prod",
                "other": "z",
            }
        },
        "HostConfig": {"NetworkMode": "bridge"},
        "NetworkSettings": {
            "Networks": {
                "bridge": {"IPAddress": "172.17.0.5", "GlobalIPv6Address": ""},
                "shop_default": {"IPAddress": "172.20.0.3", "GlobalIPv6Address": "fd00::3"},
            }
        },
    }
    base.update(over)
    return base


def test_parse_running_container() -> None:
    c = parse_container(inspect())
    assert c is not None
    assert c.name == "web-1" and c.pid == 4242 and c.netns_path == "/proc/4242/ns/net"
    assert c.ips == ["172.17.0.5", "172.20.0.3", "fd00::3"]
    assert c.pairing_key == "segd1.x.y"
    assert c.requested_labels == {"env": "prod", "role": "web"}
    assert not c.host_network


@pytest.mark.parametrize("state", [{"Running": False, "Pid": 0}, {"Running": True, "Pid": 0}, {}])
def test_parse_not_running(state: dict[str, Any]) -> None:
    assert parse_container(inspect(State=state)) is None


def test_parse_unkeyed_host_network_and_junk_ip() -> None:
    c = parse_container(
        inspect(
            Config={"Labels": None},
            HostConfig={"NetworkMode": "host"},
            NetworkSettings={"Networks": {"host": {"IPAddress": "not-an-ip"}}},
        )
    )
    assert c is not None and c.pairing_key == "" and c.host_network and c.ips == []


def test_bridge_subnets_only_bridges() -> None:
    nets = [
        {
            "Driver": "bridge",
            "IPAM": {"Config": [{"Subnet": "172.17.0.0/16", "Gateway": "172.17.0.1"}]},
        },
        {
            "Driver": "bridge",
            "IPAM": {"Config": [{"Subnet": "fd00::/64"}, {"Subnet": "172.20.0.0/16"}]},
        },
        {"Driver": "host", "IPAM": {"Config": []}},
        {"Driver": "macvlan", "IPAM": {"Config": [{"Subnet": "192.0.2.0/24"}]}},
        {"Driver": "bridge", "IPAM": {"Config": None}},
    ]
    assert bridge_subnets(nets) == ["172.17.0.0/16", "172.20.0.0/16", "fd00::/64"]


def _signed(key: nacl.signing.SigningKey, instr: Instructions) -> SignedInstructions:
    payload = msgspec.json.encode(instr)
    return SignedInstructions(
        key_id=crypto.key_id_of(key.verify_key),
        payload=crypto.b64e(payload),
        signature=crypto.b64e(key.sign(payload).signature),
    )


def _instr(host: str = "h1", version: int = 3) -> Instructions:
    return Instructions(host_id=host, version=version, workloads=[], sets={}, rules=[])


def test_verify_instructions_cases() -> None:
    key = nacl.signing.SigningKey.generate()
    other = nacl.signing.SigningKey.generate()
    keys = {crypto.key_id_of(key.verify_key): crypto.b64e(bytes(key.verify_key))}
    good = _signed(key, _instr())
    assert verify_instructions(good, keys, "h1").version == 3
    cases = {
        "wrong host": (good, "h2"),
        "other signer": (_signed(other, _instr()), "h1"),
        "tampered payload": (
            msgspec.structs.replace(
                good, payload=crypto.b64e(msgspec.json.encode(_instr(version=99)))
            ),
            "h1",
        ),
        "bad base64": (msgspec.structs.replace(good, signature="!!"), "h1"),
    }
    for name, (signed, host) in cases.items():
        with pytest.raises(InvalidInstructions):
            verify_instructions(signed, keys, host)
            pytest.fail(name)


def test_state_dir_keeps_only_verified_instructions(tmp_path: Path) -> None:
    key = nacl.signing.SigningKey.generate()
    ident = Identity(
        host_id="h1",
        server="http://x",
        server_keys={crypto.key_id_of(key.verify_key): crypto.b64e(bytes(key.verify_key))},
    )
    st = StateDir(tmp_path / "agent")
    assert st.identity() is None and st.load_instructions(ident) is None
    st.save_identity(ident)
    st.save_instructions(_signed(key, _instr()))
    again = StateDir(tmp_path / "agent")
    assert again.identity() == ident
    loaded = again.load_instructions(ident)
    assert loaded is not None and loaded[1].version == 3
    assert (tmp_path / "agent" / "agent.key").exists() is False
    again.signing_key()
    assert (tmp_path / "agent" / "agent.key").stat().st_mode & 0o777 == 0o600
    # A file changed on disk no longer verifies and is not used.
    p = tmp_path / "agent" / "instructions.json"
    p.write_bytes(p.read_bytes().replace(b'"signature":"', b'"signature":"A'))
    assert again.load_instructions(ident) is None


def test_pairing_answer_with_or_without_instructions() -> None:
    """Today's server sends the host's signed instructions with a pairing; a server
    that sends only the version the workload appears in leaves them to the long-poll."""
    signed = SignedInstructions(key_id="k", payload="cA", signature="cw")
    full = msgspec.json.encode(
        {"workload_id": "w1", "labels": {"role": "web"}, "instructions": signed}
    )
    answer = msgspec.json.decode(full, type=PairAnswer)
    assert answer.instructions == signed and answer.version == 0
    small = b'{"workload_id":"w1","labels":{"role":"web"},"version":7}'
    answer = msgspec.json.decode(small, type=PairAnswer)
    assert answer.instructions is None and answer.version == 7
