"""A real segd stack for end-to-end tests: `segd server` and `segd agent` as
processes, containers on the real Docker engine, probes with real packets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segd import wire
from segd.http.client import Client, ClientError
from segd.server import tokens

IMAGE = "segd-busybox:latest"
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"
TEST_LABEL = "segd.test"
# Every test container serves these two ports, so a refused probe means a drop.
SERVE = "httpd -p 5432 -h /www && httpd -p 80 -h /www && exec sleep 100000"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def docker(*args: str, check: bool = True, timeout: float = 60) -> str:
    p = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout.strip()


def restart_dockerd() -> None:
    """Stop dockerd and start it again (containers with a restart policy come back)."""
    subprocess.run(["pkill", "-TERM", "-x", "dockerd"], check=False)
    wait_for(
        lambda: subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True).returncode != 0,
        60,
        "dockerd to exit",
        interval=0.2,
    )
    subprocess.run(["bash", "scripts/host-setup.sh"], check=True, capture_output=True)


def wait_for(pred: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        rc = self.popen.returncode
        self.popen = None
        self.log.close()
        return rc

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def count(self, event: str) -> int:
        return sum(1 for e in self.logs() if e.get("event") == event)


@dataclass
class Stack:
    root: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    server: Proc | None = None
    agent: Proc | None = None
    port: int = 0
    listen_host: str = "127.0.0.1"  # the test bed's server listens on the underlay
    token: str = ""
    containers: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)

    # ---- processes ---------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        return env

    def start_server(self, config: str = "") -> None:
        """Start the server; `config`: TOML for its config file (e.g. `[server.mesh]`)."""
        self.port = self.port or free_port()
        data = self.root / "server"
        argv = [sys.executable, "-m", "segd", "server"]
        if config:
            (self.root / "server.toml").write_text(config)
            argv += ["--config", str(self.root / "server.toml")]
        self.server = Proc(
            "server",
            [
                *argv,
                "--data-dir",
                str(data),
                "--listen",
                f"{self.listen_host}:{self.port}",
            ],
            self.root / "server.log",
            self._env(),
        )
        self.server.start()
        wait_for(self._healthy, 20, "server health")
        self.token = (data / "admin.token").read_text().strip()

    def _healthy(self) -> bool:
        try:
            Client(self.url, "", timeout=1).call("GET", "/v1/health")
            return True
        except ClientError:
            if self.server and self.server.popen and self.server.popen.poll() is not None:
                tail = self.server.log_path.read_text()[-3000:]
                raise AssertionError("server exited:\n" + tail) from None
            return False

    def start_agent(
        self,
        *,
        interval: float = 2.0,
        isolate_unkeyed: bool = True,
        server: str = "",
        extra: str = "",
    ) -> None:
        """`server`: the URL the agent talks to (default the server's own);
        `extra`: more `[agent]` lines."""
        state = self.root / "agent"
        cfg = self.root / "agent.toml"
        cfg.write_text(
            '[log]\nlevel = "debug"\nformat = "json"\n\n[agent]\n'
            f'server = "{server or self.url}"\nstate_dir = "{state}"\n'
            f"reconcile_interval_s = {interval}\n"
            f"isolate_unkeyed = {'true' if isolate_unkeyed else 'false'}\n"
            "backoff_max_s = 2.0\n" + extra
        )
        argv = [sys.executable, "-m", "segd", "agent", "--config", str(cfg)]
        env = self._env()
        if not (state / "identity.json").exists():
            # The code from the environment, out of the process list.
            code = self.api("POST", "/v1/activation-codes", wire.ActivationCodeIn())["code"]
            env["SEGD_ACTIVATION_CODE"] = code
        self.agent = Proc("agent", argv, self.root / "agent.log", env)
        before = self.agent.count("agent.synced") if self.agent.log_path.exists() else 0
        self.agent.start()
        wait_for(lambda: self._agent_synced(before), 30, "agent first sync")

    def _agent_synced(self, before: int) -> bool:
        assert self.agent is not None and self.agent.popen is not None
        if self.agent.popen.poll() is not None:
            raise AssertionError("agent exited:\n" + self.agent.log_path.read_text()[-3000:])
        return self.agent.count("agent.synced") > before

    def close(self) -> None:
        for cid in self.containers:
            docker("rm", "-f", cid, check=False)
        for net in self.networks:
            docker("network", "rm", net, check=False)
        for p in (self.agent, self.server):
            if p is not None:
                p.stop()

    # ---- admin API -----------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """One admin request (a body is a wire Struct or plain JSON values); its
        answer as plain JSON values; an error answer fails the test."""
        client = Client(self.url, self.token, timeout=10)
        try:
            return client.json(method, path, body)
        except ClientError as e:
            raise AssertionError(f"{method} {path} -> {e.http} {e.code}: {e.message}") from None

    def rule(self, provider: dict[str, str], consumer: dict[str, str], *services: str) -> str:
        body = wire.RuleIn(providers=[provider], consumers=[consumer], services=list(services))
        return str(self.api("POST", "/v1/rules", body)["id"])

    def ctl(self, *args: str) -> str:
        """`segd ctl ARGS` as a process against this server; its stdout (a
        failure fails the test with its stderr)."""
        env = {**self._env(), "SEGD_TOKEN": self.token}
        p = subprocess.run(
            [sys.executable, "-m", "segd", "ctl", "--server", self.url, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        if p.returncode != 0:
            raise AssertionError(f"segd ctl {' '.join(args)} -> {p.returncode}: {p.stderr}")
        return p.stdout

    def key(
        self,
        labels: dict[str, str],
        *,
        max_uses: int = 10,
        lock: Iterable[str] = (),
        lifespan_s: int = 3600,
    ) -> str:
        name = "p-" + uuid.uuid4().hex[:8]
        profile = wire.ProfileIn(
            name=name,
            labels=labels,
            locked=list(lock),
            max_uses=max_uses,
            lifespan_s=lifespan_s,
        )
        self.api("POST", "/v1/profiles", profile)
        return str(self.api("POST", "/v1/keys", wire.KeyIssueIn(profile=name))["token"])

    def key_row(self, token: str) -> dict[str, Any]:
        """The server's record of a key (uses, expiry, revoked) by its token."""
        kid = tokens.parse(token)[0].kid
        [row] = [k for k in self.api("GET", "/v1/keys") if k["key_id"] == kid]
        return dict(row)

    def workloads(self) -> list[dict[str, Any]]:
        return list(self.api("GET", "/v1/workloads"))

    # ---- containers ----------------------------------------------------------------

    def run(
        self,
        name: str,
        *,
        key: str = "",
        labels: dict[str, str] | None = None,
        cmd: str = SERVE,
        network: str = "",
        ip: str = "",
        extra: Iterable[str] = (),
    ) -> str:
        args = [
            "run",
            "-d",
            "--name",
            f"segdt-{self.run_id}-{name}",
            "--label",
            f"{TEST_LABEL}={self.run_id}",
        ]
        if key:
            args += ["--label", f"segd.pairing-key={key}"]
        for k, v in (labels or {}).items():
            args += ["--label", f"segd.label.{k}={v}"]
        if network:
            args += ["--network", network]
        if ip:
            args += ["--ip", ip]
        args += [*extra, IMAGE, "sh", "-c", cmd]
        cid = docker(*args)
        self.containers.append(cid)
        return cid

    def rm(self, cid: str) -> None:
        docker("rm", "-f", cid)

    def network(self, subnet: str) -> str:
        name = f"segdt-{self.run_id}-{len(self.networks)}"
        docker("network", "create", "--subnet", subnet, name)
        self.networks.append(name)
        return name

    @staticmethod
    def ip(cid: str) -> str:
        out = docker(
            "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", cid
        )
        return out.split()[0]

    def enforced(self, cid: str) -> bool:
        """The agent has put a paired workload's table in place for `cid`."""
        assert self.agent is not None
        return any(
            e.get("event") == "enforce.done"
            and e.get("kind") == "workload"
            and cid.startswith(str(e.get("container", "-")))
            for e in self.agent.logs()
        )

    def wait_paired(self, *cids: str, timeout: float = 15) -> None:
        def done() -> bool:
            paired = {w["container_id"] for w in self.workloads()}
            return all(c in paired for c in cids) and all(self.enforced(c) for c in cids)

        wait_for(done, timeout, f"pairing of {[c[:12] for c in cids]}", interval=0.1)

    # ---- probes ----------------------------------------------------------------------

    @staticmethod
    def probe_many(
        src: str, targets: list[tuple[str, int]], wait: int = 1
    ) -> dict[tuple[str, int], bool]:
        """Connect from inside `src` to every (ip, port) at once; True = connected."""
        script = (
            " ".join(
                f"(nc -w {wait} {ip} {port} </dev/null >/dev/null 2>&1 && echo 'ok {ip} {port}' "
                f"|| echo 'no {ip} {port}') &"
                for ip, port in targets
            )
            + " wait"
        )
        out = docker("exec", src, "sh", "-c", script, timeout=30)
        res: dict[tuple[str, int], bool] = {}
        for line in out.splitlines():
            verdict, ip, port = line.split()
            res[(ip, int(port))] = verdict == "ok"
        assert set(res) == set(targets), out
        return res

    def matrix(
        self, names: dict[str, str], ports: Iterable[int]
    ) -> dict[tuple[str, str, int], bool]:
        """Probe every ordered pair of containers on every port, in parallel."""
        ips = {n: self.ip(c) for n, c in names.items()}
        ports = list(ports)

        def one(src: str) -> dict[tuple[str, str, int], bool]:
            targets = [(ips[d], p) for d in names if d != src for p in ports]
            got = self.probe_many(names[src], targets)
            by_ip = {v: k for k, v in ips.items()}
            return {(src, by_ip[ip], port): ok for (ip, port), ok in got.items()}

        out: dict[tuple[str, str, int], bool] = {}
        with ThreadPoolExecutor(len(names)) as pool:
            for part in pool.map(one, names):
                out.update(part)
        return out
