"""The test bed's plan (segd.bed.plan): names, addresses, command lines, the agent
config it writes and the leftovers it recognises."""

from __future__ import annotations

import shlex
import tomllib

import pytest

from segd import config
from segd.bed import plan
from segd.bed.plan import HostPlan
from segd.bed.system import _unescape


def test_host_names_addresses_and_files() -> None:
    h = HostPlan(2)
    assert (h.name, h.address, h.netns_path) == (
        "segd-bed-h2",
        "10.250.0.12",
        "/run/netns/segd-bed-h2",
    )
    assert h.docker_url == "unix:///run/segd-bed/h2/docker.sock"
    assert str(h.data_root) == "/var/lib/segd-bed/h2"
    assert str(h.exec_root) == "/run/segd-bed/h2/exec"
    assert h.holder_marker == "segd-bed-h2-mnt" and h.cgroup_parent == "/segd-bed-h2"
    assert [p.address for p in plan.hosts(3)] == ["10.250.0.11", "10.250.0.12", "10.250.0.13"]


def test_every_host_fits_the_underlay_and_link_names() -> None:
    hosts = plan.hosts(plan.MAX_HOSTS)
    addresses = {h.address for h in hosts}
    assert len(addresses) == plan.MAX_HOSTS and plan.ROOT_ADDRESS not in addresses
    assert all(h.address.startswith("10.250.0.") for h in hosts)
    assert all(len(h.name) <= 15 for h in hosts)  # IFNAMSIZ - 1: the root-side veth
    assert len(plan.BRIDGE) <= 15


@pytest.mark.parametrize("n", [0, -1, plan.MAX_HOSTS + 1])
def test_a_bed_has_between_one_and_max_hosts(n: int) -> None:
    with pytest.raises(ValueError, match="hosts: must be between 1 and 32"):
        plan.hosts(n)


def test_host_index_reads_run_dir_entries_only() -> None:
    assert [plan.host_index(n) for n in ("h1", "h12", "h0", "h01", "x1", "h", "images.tar")] == [
        1, 12, None, None, None, None, None,
    ]  # fmt: skip


def test_bed_names_are_the_prefix_or_start_with_it_and_a_dash() -> None:
    assert plan.is_bed_name("segd-bed") and plan.is_bed_name("segd-bed-h3")
    assert not plan.is_bed_name("segd-bedrock") and not plan.is_bed_name("docker0")


def test_the_forward_rule_is_found_again_and_deleted_exactly() -> None:
    listing = "\n".join(
        [
            "-P FORWARD DROP",
            "-A FORWARD " + shlex.join(plan.forward_rule()),
            "-A FORWARD -j DOCKER-USER",
            '-A FORWARD -i x -m comment --comment "segd-bed other" -j ACCEPT',
            "-A FORWARD -i y -m comment --comment segd-bed-2 -j ACCEPT",
            "-A FORWARD -o docker0 -j DOCKER",
            "-A FORWARD -m comment --comment 'unbalanced",
        ]
    )
    assert plan.rule_deletions("filter", listing) == [
        ["-t", "filter", "-D", "FORWARD", *plan.forward_rule()]
    ]
    assert plan.rule_deletions("nat", "") == []


def test_the_underlay_batch_wires_a_host_to_the_bridge() -> None:
    root, inside = plan.underlay_batch(HostPlan(1))
    assert root.splitlines() == [
        "link add segd-bed-h1 type veth peer name eth0 netns segd-bed-h1",
        "link set segd-bed-h1 master segd-bed up",
    ]
    assert "addr add 10.250.0.11/24 dev eth0" in inside.splitlines()
    assert inside.splitlines()[-1] == "route add default via 10.250.0.1"


def test_commands_enter_with_nsenter_not_ip_netns_exec() -> None:
    h = HostPlan(1)
    argv = plan.enter_argv(h, 4242, ["docker", "ps"], cwd="/tmp")
    assert argv == [
        "nsenter",
        "--net=/run/netns/segd-bed-h1",
        "--mount=/proc/4242/ns/mnt",
        "--wd=/tmp",
        "--",
        "docker",
        "ps",
    ]
    holder = plan.holder_argv(h)
    assert holder[:2] == ["nsenter", "--net=/run/netns/segd-bed-h1"]
    assert "--mount" in holder and holder[-1] == "exec -a segd-bed-h1-mnt sleep infinity"


def test_dockerd_gets_its_own_paths_and_no_shared_config() -> None:
    h = HostPlan(3)
    argv = plan.dockerd_argv(h)
    flags = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert flags == {
        "--config-file": "/run/segd-bed/h3/daemon.json",
        "--data-root": "/var/lib/segd-bed/h3",
        "--exec-root": "/run/segd-bed/h3/exec",
        "--pidfile": "/run/segd-bed/h3/dockerd.pid",
        "-H": "unix:///run/segd-bed/h3/docker.sock",
        "--cgroup-parent": "/segd-bed-h3",
        "--log-level": "warn",
    }
    assert "--bip" not in argv  # Docker's default docker0 on every host, as on real fleets


@pytest.mark.parametrize(
    ("argv", "bed"),
    [
        (("segd-bed-h2-mnt", "infinity"), True),
        (tuple(plan.dockerd_argv(HostPlan(1))), True),
        (("containerd", "--config", "/run/segd-bed/h1/exec/containerd/containerd.toml"), True),
        (("/usr/bin/containerd-shim-runc-v2", "-address", "/run/segd-bed/h1/exec/c.sock"), True),
        (("/usr/sbin/dockerd",), False),  # the machine's own engine
        (("containerd", "--config", "/var/run/docker/containerd/containerd.toml"), False),
        (("less", "/run/segd-bed/h1/dockerd.log"), False),  # someone reading a log
        (("segd-bed-hx-mnt",), False),
        ((), False),
    ],
)
def test_bed_processes_are_holders_and_engines_under_the_run_dir(
    argv: tuple[str, ...], bed: bool
) -> None:
    assert plan.is_bed_process(argv) is bed


def test_the_agent_config_is_a_valid_segd_config() -> None:
    text = plan.agent_config(
        server="http://10.250.0.1:7400",
        state_dir="/tmp/x y/state",
        docker_url="unix:///run/segd-bed/h1/docker.sock",
        hostname="segd-bed-h1",
        activation_code="act_abc",
        options={"reconcile_interval_s": 2.0, "isolate_unkeyed": False},
    )
    cfg = config.decode(tomllib.loads(text))
    a = cfg.agent
    assert (a.server, a.state_dir, a.docker_url, a.hostname, a.activation_code) == (
        "http://10.250.0.1:7400",
        "/tmp/x y/state",
        "unix:///run/segd-bed/h1/docker.sock",
        "segd-bed-h1",
        "act_abc",
    )
    assert a.reconcile_interval_s == 2.0 and a.isolate_unkeyed is False
    assert cfg.log.format == "json"


def test_an_agent_config_without_a_code_leaves_the_key_out() -> None:
    text = plan.agent_config(
        server="http://a:1", state_dir="/s", docker_url="unix:///d", hostname="h"
    )
    assert "activation_code" not in text
    assert config.decode(tomllib.loads(text)).agent.activation_code == ""


def test_mountinfo_escapes_are_decoded() -> None:
    assert _unescape(r"/run/segd-bed/a\040b\011c\134d") == "/run/segd-bed/a b\tc\\d"
    assert _unescape("/plain") == "/plain" and _unescape("/end\\04") == "/end\\04"
