"""The bed's plan, pure: names, addresses, paths and the command lines that use them.

Everything the bed creates carries PREFIX (`segd-bed`), so a teardown can find
it again from nothing but the machine's state.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import TypeAlias

PREFIX = "segd-bed"
BRIDGE = PREFIX  # the underlay bridge in the root namespace
COMMENT = PREFIX  # tags the root iptables rules the bed adds
UNDERLAY = IPv4Network("10.250.0.0/24")
ROOT_ADDRESS = "10.250.0.1"  # the root namespace on the underlay (the server listens here)
FIRST_HOST = 11  # host i is 10.250.0.(10 + i)
MAX_HOSTS = 32
RUN_DIR = Path("/run/segd-bed")  # per host: sockets, pidfiles, exec-root, logs, agents
DATA_DIR = Path("/var/lib/segd-bed")  # per host: the engine's data-root
IMAGE = "segd-busybox:latest"
HOST_UPLINK = "eth0"  # the host's side of its veth, inside its namespace
# The processes a bed engine consists of (argv[0] basenames), found by their bed paths.
ENGINE_PROGRAMS = frozenset({"dockerd", "containerd", "containerd-shim-runc-v2", "docker-proxy"})
HOLDER_RE = re.compile(rf"^{re.escape(PREFIX)}-h[0-9]+-mnt\Z")


@dataclass(frozen=True)
class HostPlan:
    """Simulated host `index` (1-based): its names, address and files."""

    index: int

    @property
    def name(self) -> str:
        """Network namespace, root-side veth, cgroup parent and agent hostname."""
        return f"{PREFIX}-h{self.index}"

    @property
    def address(self) -> str:
        return str(UNDERLAY.network_address + FIRST_HOST - 1 + self.index)

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.name}"

    @property
    def run_dir(self) -> Path:
        return RUN_DIR / f"h{self.index}"

    @property
    def data_root(self) -> Path:
        return DATA_DIR / f"h{self.index}"

    @property
    def exec_root(self) -> Path:
        return self.run_dir / "exec"

    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def docker_url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def dockerd_pidfile(self) -> Path:
        return self.run_dir / "dockerd.pid"

    @property
    def containerd_pidfile(self) -> Path:
        return self.exec_root / "containerd" / "containerd.pid"

    @property
    def holder_pidfile(self) -> Path:
        return self.run_dir / "holder.pid"

    @property
    def dockerd_log(self) -> Path:
        return self.run_dir / "dockerd.log"

    @property
    def daemon_json(self) -> Path:
        return self.run_dir / "daemon.json"

    @property
    def holder_marker(self) -> str:
        """argv[0] of the process that keeps the host's mount namespace alive."""
        return f"{self.name}-mnt"

    @property
    def cgroup_parent(self) -> str:
        return f"/{self.name}"


def hosts(n: int) -> list[HostPlan]:
    if not 1 <= n <= MAX_HOSTS:
        raise ValueError(f"hosts: must be between 1 and {MAX_HOSTS}")
    return [HostPlan(i) for i in range(1, n + 1)]


def host_index(name: str) -> int | None:
    """`h3` (a run-dir entry) -> 3."""
    m = re.fullmatch(r"h([1-9][0-9]*)", name)
    return int(m[1]) if m else None


def is_bed_name(name: str) -> bool:
    return name == PREFIX or name.startswith(PREFIX + "-")


def underlay_batch(host: HostPlan) -> tuple[str, str]:
    """`ip -batch` input for the root side and for the host side of its veth."""
    root = (
        f"link add {host.name} type veth peer name {HOST_UPLINK} netns {host.name}\n"
        f"link set {host.name} master {BRIDGE} up\n"
    )
    inside = (
        "link set lo up\n"
        f"addr add {host.address}/{UNDERLAY.prefixlen} dev {HOST_UPLINK}\n"
        f"link set {HOST_UPLINK} up\n"
        f"route add default via {ROOT_ADDRESS}\n"
    )
    return root, inside


def forward_rule() -> list[str]:
    """The root FORWARD accept for frames between hosts (Docker's policy is DROP and
    bridge-nf-call-iptables applies it to the underlay bridge)."""
    return ["-i", BRIDGE, "-o", BRIDGE, "-m", "comment", "--comment", COMMENT, "-j", "ACCEPT"]


def rule_deletions(table: str, listing: str) -> list[list[str]]:
    """iptables arguments deleting every rule of `iptables -t TABLE -S` tagged COMMENT."""
    out = []
    for line in listing.splitlines():
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        if len(words) < 3 or words[0] != "-A":
            continue
        tagged = any(a == "--comment" and b == COMMENT for a, b in itertools.pairwise(words))
        if tagged:
            out.append(["-t", table, "-D", *words[1:]])
    return out


def holder_argv(host: HostPlan) -> list[str]:
    """A sleeping process in the host's network namespace and its own mount namespace
    (propagation slave: later mounts in the root reach it, none of its own leave)."""
    return [
        "nsenter",
        f"--net={host.netns_path}",
        "unshare",
        "--mount",
        "--propagation",
        "slave",
        "--",
        "bash",
        "-c",
        f"exec -a {host.holder_marker} sleep infinity",
    ]


def enter_argv(host: HostPlan, holder_pid: int, argv: Sequence[str], cwd: str = "/") -> list[str]:
    """`argv` run on the host: its network and mount namespaces. Not `ip netns exec`,
    which remounts /sys (dockerd then fails: "Devices cgroup isn't mounted")."""
    return [
        "nsenter",
        f"--net={host.netns_path}",
        f"--mount=/proc/{holder_pid}/ns/mnt",
        f"--wd={cwd}",
        "--",
        *argv,
    ]


def dockerd_argv(host: HostPlan) -> list[str]:
    return [
        "dockerd",
        "--config-file",
        str(host.daemon_json),
        "--data-root",
        str(host.data_root),
        "--exec-root",
        str(host.exec_root),
        "--pidfile",
        str(host.dockerd_pidfile),
        "-H",
        host.docker_url,
        "--cgroup-parent",
        host.cgroup_parent,
        "--log-level",
        "warn",
    ]


def is_bed_process(argv: Sequence[str]) -> bool:
    """A holder, or an engine program working in the bed's run directory."""
    if not argv:
        return False
    if HOLDER_RE.match(argv[0]):
        return True
    if argv[0].rsplit("/", 1)[-1] not in ENGINE_PROGRAMS:
        return False
    run = str(RUN_DIR) + "/"
    return any(a.startswith((run, "unix://" + run)) for a in argv[1:])


TomlValue: TypeAlias = str | int | float | bool


def agent_config(
    *,
    server: str,
    state_dir: str,
    docker_url: str,
    hostname: str,
    activation_code: str = "",
    options: Mapping[str, TomlValue] | None = None,
    log_level: str = "debug",
    mesh: Mapping[str, TomlValue] | None = None,
) -> str:
    """A `segd agent` config file for one host (options: more `[agent]` keys; mesh:
    `[agent.mesh]` keys)."""
    agent: dict[str, TomlValue] = {
        "server": server,
        "state_dir": state_dir,
        "docker_url": docker_url,
        "hostname": hostname,
    }
    if activation_code:
        agent["activation_code"] = activation_code
    agent.update(options or {})
    lines = ["[log]", f"level = {_toml(log_level)}", 'format = "json"', "", "[agent]"]
    lines += [f"{k} = {_toml(v)}" for k, v in agent.items()]
    if mesh:
        lines += ["", "[agent.mesh]", *(f"{k} = {_toml(v)}" for k, v in mesh.items())]
    return "\n".join(lines) + "\n"


def _toml(v: TomlValue) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(v)  # a TOML basic string
