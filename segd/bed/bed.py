"""The bed and its hosts: bring-up, running things on a host, agents, teardown."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from segd.bed import plan, sweep
from segd.bed.agent import BedAgent, agent_env
from segd.bed.plan import (
    BRIDGE,
    DATA_DIR,
    IMAGE,
    ROOT_ADDRESS,
    RUN_DIR,
    UNDERLAY,
    HostPlan,
    TomlValue,
)
from segd.bed.system import BedError, inode, read_pid, read_proc, rss_kib, run

DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"
TOOLS = ("ip", "nsenter", "unshare", "bash", "dockerd", "docker", "busybox")


WIREGUARD_DIR = "/run/wireguard"


@dataclass
class BedHost:
    """One simulated host: a network namespace with its own `dockerd`, a long-lived
    mount namespace (held by a sleeping process) and an address on the underlay."""

    plan: HostPlan
    holder_pid: int
    agents: list[BedAgent] = field(default_factory=list)

    @property
    def index(self) -> int:
        return self.plan.index

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def address(self) -> str:
        return self.plan.address

    @property
    def docker_url(self) -> str:
        return self.plan.docker_url

    # ---- running things on the host ----------------------------------------------------

    def argv(self, argv: Sequence[str], cwd: str | None = None) -> list[str]:
        """`argv` wrapped to run in the host's network and mount namespaces."""
        return plan.enter_argv(self.plan, self.holder_pid, argv, cwd or os.getcwd())

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["DOCKER_HOST"] = self.docker_url
        return env

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on the host (DOCKER_HOST set to its engine)."""
        return run(self.argv(argv), check=check, timeout=timeout, input=input, env=self.env())

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a command on the host; keyword arguments go to subprocess.Popen."""
        env = kw.pop("env", None)
        return subprocess.Popen(self.argv(argv), env=self.env(env), **kw)

    def docker(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """The docker CLI against this host's engine; its stdout, stripped."""
        p = run([DOCKER, "-H", self.docker_url, *args], check=check, timeout=timeout)
        return p.stdout.strip()

    def ping(self, address: str, timeout: int = 1) -> bool:
        """One ICMP echo from the host's namespace."""
        argv = ("busybox", "ping", "-c", "1", "-W", str(timeout), address)
        return self.run(*argv, check=False, timeout=timeout + 10).returncode == 0

    def probe(
        self, container: str, targets: Iterable[tuple[str, int]], wait: int = 1
    ) -> dict[tuple[str, int], bool]:
        """TCP connects from inside `container` to every (ip, port) at once; True =
        connected."""
        targets = list(targets)
        script = (
            " ".join(
                f"(nc -w {wait} {ip} {port} </dev/null >/dev/null 2>&1 && echo 'ok {ip} {port}' "
                f"|| echo 'no {ip} {port}') &"
                for ip, port in targets
            )
            + " wait"
        )
        out = self.docker("exec", container, "sh", "-c", script, timeout=30)
        res: dict[tuple[str, int], bool] = {}
        for line in out.splitlines():
            verdict, ip, port = line.split()
            res[(ip, int(port))] = verdict == "ok"
        if set(res) != set(targets):
            raise BedError(f"probe from {container}: unexpected output {out!r}")
        return res

    def private_dir(self, path: str | Path, size: str = "16m") -> None:
        """A tmpfs at `path` that only this host sees, for its life (its mount
        namespace), e.g. wireguard-go's /run/wireguard."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self.run(
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"mode=0755,size={size}",
            f"{self.name}-private",
            str(path),
        )

    # ---- agents ----------------------------------------------------------------------------

    def agent(
        self,
        server: str,
        activation_code: str = "",
        *,
        workdir: Path | None = None,
        options: Mapping[str, TomlValue] | None = None,
        log_level: str = "debug",
        mesh: Mapping[str, TomlValue] | None = None,
    ) -> BedAgent:
        """An agent for this host (not started): config written to `workdir` (default
        the host's run directory), docker_url = this host's engine."""
        workdir = workdir or self.plan.run_dir / "agent"
        workdir.mkdir(parents=True, exist_ok=True)
        handle = BedAgent(lambda argv: self.argv(argv), workdir, agent_env())
        handle.config.write_text(
            plan.agent_config(
                server=server,
                state_dir=str(handle.state_dir),
                docker_url=self.docker_url,
                hostname=self.name,
                activation_code=activation_code,
                options=options,
                log_level=log_level,
                mesh=mesh,
            )
        )
        self.agents.append(handle)
        return handle

    def start_agent(
        self,
        server: str,
        activation_code: str = "",
        *,
        workdir: Path | None = None,
        options: Mapping[str, TomlValue] | None = None,
        wait: bool = True,
        mesh: Mapping[str, TomlValue] | None = None,
    ) -> BedAgent:
        """`agent(...)` and start it (with `wait`, until its first sync)."""
        handle = self.agent(server, activation_code, workdir=workdir, options=options, mesh=mesh)
        handle.start(wait=wait)
        return handle

    # ---- what it costs -----------------------------------------------------------------

    def pids(self) -> dict[str, int | None]:
        return {
            "holder": self.holder_pid,
            "dockerd": read_pid(self.plan.dockerd_pidfile),
            "containerd": read_pid(self.plan.containerd_pidfile),
        }

    def memory_kib(self) -> dict[str, int | None]:
        """Resident memory of the host's engine processes."""
        pids = self.pids()
        return {k: rss_kib(pids[k]) for k in ("dockerd", "containerd")}


class Bed:
    """N simulated hosts on one machine; see the package docstring."""

    root_address = ROOT_ADDRESS

    def __init__(self, hosts: list[BedHost], owned: Iterable[subprocess.Popen[bytes]] = ()):
        self.hosts = hosts
        self._owned = list(owned)
        self.up_seconds = 0.0

    def host(self, index: int) -> BedHost:
        """Host `index`, 1-based as in its names (`segd-bed-h1`)."""
        if not 1 <= index <= len(self.hosts):
            raise BedError(f"no host {index}: the bed has {len(self.hosts)}")
        return self.hosts[index - 1]

    def server_url(self, port: int) -> str:
        """A server listening on the root's underlay address, as agents reach it."""
        return f"http://{ROOT_ADDRESS}:{port}"

    # ---- bring-up ----------------------------------------------------------------------

    @classmethod
    def up(cls, n: int = 3, *, images: Sequence[str] = (IMAGE,)) -> Bed:
        """Bring up `n` hosts, after removing whatever an earlier bed left."""
        started = time.monotonic()
        try:
            plans = plan.hosts(n)
        except ValueError as e:
            raise BedError(str(e)) from None
        _check_prerequisites(images)
        left = sweep.down()
        if left:
            raise BedError("leftovers of an earlier bed could not be removed: " + "; ".join(left))
        _check_underlay_free()
        owned: list[subprocess.Popen[bytes]] = []
        try:
            RUN_DIR.mkdir(parents=True, exist_ok=True)
            DATA_DIR.mkdir(parents=True, exist_ok=True)
            _make_underlay()
            with ThreadPoolExecutor(n + 1) as pool:
                saved = pool.submit(_save_images, images)
                hosts = list(pool.map(lambda p: _start_host(p, owned), plans))
                tar = saved.result()
                if tar is not None:
                    list(pool.map(lambda h: h.docker("load", "-i", str(tar), timeout=120), hosts))
        except BaseException:
            _reap(owned, [])
            sweep.down()
            raise
        bed = cls(hosts, owned)
        bed.up_seconds = time.monotonic() - started
        return bed

    @classmethod
    def attach(cls) -> Bed:
        """The bed that is up on this machine (brought up by another process)."""
        hosts = []
        for d in sorted(RUN_DIR.glob("h*")):
            index = plan.host_index(d.name)
            if index is None:
                continue
            p = HostPlan(index)
            holder = read_pid(p.holder_pidfile)
            proc = read_proc(holder) if holder else None
            if holder is None or proc is None or proc.argv[:1] != (p.holder_marker,):
                raise BedError(f"host {index} is not up (python -m segd.bed up)")
            hosts.append(BedHost(p, holder))
        if not hosts:
            raise BedError("no bed is up (python -m segd.bed up)")
        return cls(sorted(hosts, key=lambda h: h.index))

    # ---- teardown ----------------------------------------------------------------------

    def down(self) -> list[str]:
        """Remove everything (also anything an earlier bed left); what remains (empty:
        clean)."""
        left = sweep.down()
        _reap(self._owned, [a for h in self.hosts for a in h.agents])
        return left

    def __enter__(self) -> Bed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()


# ---- bring-up steps ------------------------------------------------------------------------


def _check_prerequisites(images: Sequence[str]) -> None:
    if os.geteuid() != 0:
        raise BedError("the bed needs root (network namespaces, dockerd)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise BedError(f"the bed needs {', '.join(missing)} (make host)")
    for image in images:
        if run([DOCKER, "image", "inspect", image], check=False).returncode != 0:
            raise BedError(f"the bed loads {image} from the local engine: not there (make host)")


def _check_underlay_free() -> None:
    out = run(["ip", "-j", "-4", "route", "show", "table", "all"], check=False).stdout
    try:
        routes = json.loads(out or "[]")
    except ValueError:
        return
    for r in routes:
        dst = str(r.get("dst", ""))
        if dst in ("", "default") or r.get("dev") == BRIDGE:
            continue
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if net.version == 4 and net.overlaps(UNDERLAY) and net.prefixlen > 0:
            raise BedError(f"the underlay {UNDERLAY} overlaps a route of this machine: {dst}")


def _make_underlay() -> None:
    run(
        ["ip", "-batch", "-"],
        input=(
            f"link add {BRIDGE} type bridge\n"
            f"addr add {ROOT_ADDRESS}/{UNDERLAY.prefixlen} dev {BRIDGE}\n"
            f"link set {BRIDGE} up\n"
        ),
    )
    if shutil.which("iptables") is not None:
        run(["iptables", "-w", "-I", "FORWARD", "1", *plan.forward_rule()])


def _save_images(images: Sequence[str]) -> Path | None:
    if not images:
        return None
    tar = RUN_DIR / "images.tar"
    run([DOCKER, "save", "-o", str(tar), *images], timeout=120)
    return tar


def _start_host(p: HostPlan, owned: list[subprocess.Popen[bytes]]) -> BedHost:
    run(["ip", "netns", "add", p.name])
    root_side, inside = plan.underlay_batch(p)
    run(["ip", "-batch", "-"], input=root_side)
    run(["ip", "-n", p.name, "-batch", "-"], input=inside)
    p.run_dir.mkdir(parents=True, exist_ok=True)
    p.data_root.mkdir(parents=True, exist_ok=True)
    p.daemon_json.write_text("{}\n")  # not the machine's /etc/docker/daemon.json
    holder = _spawn(plan.holder_argv(p), owned)
    p.holder_pidfile.write_text(f"{holder.pid}\n")
    _wait_holder(p, holder)
    with open(p.dockerd_log, "ab") as log:
        dockerd = _spawn(plan.enter_argv(p, holder.pid, plan.dockerd_argv(p)), owned, log)
    deadline = time.monotonic() + 60
    while not _engine_answers(p.socket):
        if dockerd.poll() is not None or time.monotonic() > deadline:
            tail = p.dockerd_log.read_text(errors="replace")[-2000:]
            raise BedError(f"dockerd of {p.name} did not come up:\n{tail}")
        time.sleep(0.05)
    host = BedHost(p, holder.pid)
    host.private_dir(WIREGUARD_DIR, "1m")  # wireguard-go's sockets: one set per host
    return host


def _spawn(
    argv: list[str], owned: list[subprocess.Popen[bytes]], log: IO[bytes] | None = None
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL if log is None else log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # outlives a Ctrl-C of whoever brought the bed up
    )
    owned.append(proc)
    return proc


def _wait_holder(p: HostPlan, holder: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Until the holder sleeps in its own mount namespace."""
    mine = inode("/proc/self/ns/mnt")
    deadline = time.monotonic() + timeout
    while True:
        proc = read_proc(holder.pid)
        if proc is not None and proc.argv[:1] == (p.holder_marker,) and proc.mnt != mine:
            return
        if holder.poll() is not None or time.monotonic() > deadline:
            raise BedError(f"the mount namespace holder of {p.name} did not start")
        time.sleep(0.005)


def _engine_answers(sock: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(sock))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return s.recv(64).split(b" ")[1:2] == [b"200"]
    except OSError:
        return False


def _reap(owned: list[subprocess.Popen[bytes]], agents: list[BedAgent]) -> None:
    """Collect the processes this object started (the sweep has killed them)."""
    for a in agents:
        a.kill()
    for proc in owned:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    owned.clear()
