"""A fleet on the bed: `segd server` on the underlay with a `[server.mesh]` pool and
one `segd agent` per simulated host in the mesh, for the fleet demo and the fleet
benchmark (the bed tests use their own server harness, tests/e2e/stack.py).

    fleet = Fleet(bed, workdir)
    fleet.start_server()
    fleet.join_all()                      # every host's agent, mesh applied
    cid, ip = fleet.run(2, "api", key)    # a container on host 2's `segd` network
    fleet.close()                         # containers, agents, server (bed.down: the rest)
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

from segd import wire
from segd.bed.agent import BedAgent, agent_env
from segd.bed.bed import Bed, BedHost
from segd.bed.plan import IMAGE, ROOT_ADDRESS, TomlValue
from segd.bed.system import BedError
from segd.http.client import Client, ClientError

POOL = "10.213.0.0/16"
HOST_PREFIX = 24
NETWORK = "segd"
LABEL = "segd.bed.fleet"  # on every container a Fleet starts
T = TypeVar("T")


def server_config(pool: str = POOL, host_prefix: int = HOST_PREFIX) -> str:
    return f'[server.mesh]\npool = "{pool}"\nhost_prefix = {host_prefix}\n'


def each(hosts: Sequence[BedHost], fn: Callable[[BedHost], T]) -> list[T]:
    """`fn` on every host at once; the results in the hosts' order."""
    if not hosts:
        return []
    with ThreadPoolExecutor(len(hosts)) as pool:
        return list(pool.map(fn, hosts))


def mesh_applied(agent: BedAgent, peers: int = 0) -> bool:
    """The agent has applied a mesh with at least `peers` peers."""
    return any(
        e.get("event") == "mesh.applied" and int(e.get("peers", -1)) >= peers for e in agent.logs()
    )


class Fleet:
    """A server on the underlay (root namespace) and the agents that join its mesh."""

    def __init__(
        self,
        bed: Bed,
        workdir: Path,
        *,
        pool: str = POOL,
        agent_options: Mapping[str, TomlValue] | None = None,
    ) -> None:
        self.bed = bed
        self.workdir = workdir
        self.pool = pool
        self.agent_options = dict(
            agent_options or {"reconcile_interval_s": 2.0, "backoff_max_s": 2.0}
        )
        self.port = _free_port()
        self.url = bed.server_url(self.port)
        self.token = ""
        self.agents: dict[int, BedAgent] = {}
        self.containers: list[tuple[BedHost, str]] = []
        self._server: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def server_log(self) -> Path:
        return self.workdir / "server.log"

    @property
    def token_file(self) -> Path:
        return self.workdir / "server" / "admin.token"

    # ---- the server ------------------------------------------------------------------

    def start_server(self, timeout: float = 30) -> None:
        config = self.workdir / "server.toml"
        config.write_text(server_config(self.pool))
        argv = [sys.executable, "-m", "segd", "server", "--config", str(config)]
        argv += ["--data-dir", str(self.workdir / "server")]
        argv += ["--listen", f"{ROOT_ADDRESS}:{self.port}"]
        self._log = open(self.server_log, "ab")  # noqa: SIM115 (closed in close)
        self._server = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=agent_env(),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if time.monotonic() > deadline:
                raise BedError(f"segd server: not healthy after {timeout:g} s")
            time.sleep(0.05)
        self.token = self.token_file.read_text().strip()

    def _healthy(self) -> bool:
        assert self._server is not None
        if self._server.poll() is not None:
            tail = self.server_log.read_text(errors="replace")[-2000:]
            raise BedError(f"segd server exited:\n{tail}")
        try:
            Client(self.url, "", timeout=1).call("GET", "/v1/health")
        except ClientError:
            return False
        return self.token_file.exists()

    @property
    def client(self) -> Client:
        return Client(self.url, self.token, timeout=30)

    def api(self, method: str, path: str, body: object = None) -> Any:
        """One admin request; its answer as plain JSON values (a `ClientError` when
        the server refuses it)."""
        return self.client.json(method, path, body)

    def rule(self, consumer: str, provider: str, service: str) -> None:
        """A rule between two roles (`role=…`)."""
        body = wire.RuleIn(
            providers=[{"role": provider}],
            consumers=[{"role": consumer}],
            services=[service],
            description=f"{consumer} uses {provider}",
        )
        self.api("POST", "/v1/rules", body)

    def key(self, role: str, labels: Mapping[str, str] | None = None) -> str:
        """A pairing key for `role` (a profile of its own, its labels locked)."""
        labels = dict(labels or {"role": role})
        profile = wire.ProfileIn(
            name=f"fleet-{role}", labels=labels, locked=sorted(labels), lifespan_s=86400
        )
        self.api("POST", "/v1/profiles", profile)
        issued = self.api("POST", "/v1/keys", wire.KeyIssueIn(profile=f"fleet-{role}"))
        return str(issued["token"])

    # ---- the agents ------------------------------------------------------------------

    def agent(self, index: int) -> BedAgent:
        """Host `index`'s agent, configured (not started) with an activation code."""
        h = self.bed.host(index)
        code = str(self.api("POST", "/v1/activation-codes", {})["code"])
        a = h.agent(
            self.url,
            code,
            workdir=self.workdir / h.name,
            options=self.agent_options,
            mesh={"enabled": True},
        )
        self.agents[index] = a
        return a

    def join(self, index: int, timeout: float = 60) -> BedAgent:
        """Start host `index`'s agent; return once it has applied its mesh."""
        a = self.agent(index)
        a.start(wait=True, timeout=timeout)
        a.wait_for(lambda: mesh_applied(a), timeout, "the mesh applied")
        return a

    def join_all(self, indices: Sequence[int] = ()) -> None:
        """Every host (or those of `indices`) joins, at once."""
        chosen = [self.bed.host(i) for i in indices] or self.bed.hosts
        each(chosen, lambda h: self.join(h.index))

    # ---- containers ------------------------------------------------------------------

    def run(
        self,
        index: int,
        name: str,
        key: str,
        command: Sequence[str],
        *,
        image: str = IMAGE,
        network: str = NETWORK,
    ) -> tuple[str, str]:
        """`docker run` on host `index`'s `network` with a pairing key (empty: none);
        the container's id and address on that network."""
        h = self.bed.host(index)
        args = ["run", "-d", "--name", name, "--network", network, "--label", f"{LABEL}=1"]
        if key:
            args += ["--label", f"segd.pairing-key={key}"]
        cid = h.docker(*args, image, *command)
        self.containers.append((h, cid))
        fmt = f"{{{{.NetworkSettings.Networks.{network}.IPAddress}}}}"
        return cid, h.docker("inspect", "-f", fmt, cid)

    def has_network(self, index: int, network: str = NETWORK) -> bool:
        h = self.bed.host(index)
        return h.docker("network", "inspect", network, check=False) not in ("", "[]")

    def remove(self, index: int, cid: str) -> None:
        h = self.bed.host(index)
        h.docker("rm", "-f", cid, check=False)
        with contextlib.suppress(ValueError):
            self.containers.remove((h, cid))

    # ---- teardown --------------------------------------------------------------------

    def close(self) -> None:
        """Remove the containers, stop the agents and the server (what the agents put
        in the hosts' namespaces goes with the bed)."""
        by_host: dict[int, list[str]] = {}
        for h, cid in self.containers:
            by_host.setdefault(h.index, []).append(cid)
        for i, cids in by_host.items():
            with contextlib.suppress(BedError, OSError):
                self.bed.host(i).docker("rm", "-f", *cids, check=False)
        self.containers.clear()
        each(list(self.bed.hosts), lambda h: self._stop_agent(h.index))
        if self._server is not None:
            if self._server.poll() is None:
                self._server.send_signal(signal.SIGTERM)
                try:
                    self._server.wait(20)
                except subprocess.TimeoutExpired:
                    self._server.kill()
                    self._server.wait(5)
            self._server = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _stop_agent(self, index: int) -> None:
        a = self.agents.get(index)
        if a is not None:
            with contextlib.suppress(OSError):
                a.stop()


def _free_port() -> int:
    """A free port on the root's underlay address (the bed is up)."""
    with socket.socket() as s:
        s.bind((ROOT_ADDRESS, 0))
        return int(s.getsockname()[1])
