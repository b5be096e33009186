"""A small fake Docker Engine: the slice of the Engine API the orchestrator and
the agent use, served over a unix socket so the real aiodocker client talks to it.

It answers like dockerd 20.10 does (status codes and `{"message": ...}`
bodies), keeps containers in memory, and can be told to fail or stall. A
running container has a pid and an address on `bridge` (172.17.0.0/16), as
Docker gives them; the event stream (`/events`) says what happened, in
Docker's order (a network connect before the start; die before destroy).
`hooks` are told of every start and stop, for a fake host that keeps the
containers' namespaces.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

BRIDGE = ipaddress.IPv4Network("172.17.0.0/16")


@dataclass
class FakeContainer:
    id: str
    name: str
    config: dict[str, Any]
    state: str = "created"
    networks: list[str] = field(default_factory=list)
    pid: int = 0
    ip: str = ""  # on `bridge`, while running

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.config.get("Labels") or {})

    @property
    def mode(self) -> str:
        return str((self.config.get("HostConfig") or {}).get("NetworkMode") or "bridge")


def _json(value: object, status: int = 200) -> web.Response:
    # dockerd sends exactly `application/json` (aiodocker relies on it).
    body = json.dumps(value).encode()
    return web.Response(body=body, status=status, headers={"Content-Type": "application/json"})


def _err(status: int, message: str) -> web.Response:
    return _json({"message": message}, status)


class FakeEngine:
    def __init__(self, *, id_prefix: str = "") -> None:
        self.images = {"segd-busybox:latest"}
        self.network_names = {"bridge", "none"}
        self.containers: dict[str, FakeContainer] = {}
        self.id_prefix = id_prefix
        self.fail_start: int | None = None  # fail the start of the Nth start call (1-based)
        self.fail_delete = False
        self.create_delay = 0.0  # seconds to stall after creating, before answering
        self.starts = 0
        self.requests: list[str] = []
        self.socket = ""
        self._runner: web.AppRunner | None = None
        self.hooks: list[Callable[[str, FakeContainer], None]] = []  # ("start"|"stop", c)
        self._pids = 4000
        self._ips = 1
        self._streams: set[asyncio.Queue[dict[str, Any] | None]] = set()
        # Answers taken, then held until set: a listing or an inspect that is slow
        # while things change (the inspect hold is per container id).
        self.hold_list: asyncio.Event | None = None
        self.hold_inspect: dict[str, asyncio.Event] = {}
        self.held = 0

    # ---- lifecycle ----------------------------------------------------------------

    async def start(self, socket_path: str) -> None:
        """Serve on a unix socket, like dockerd by default."""
        self.socket = socket_path
        await self._setup()
        assert self._runner is not None
        await web.UnixSite(self._runner, socket_path).start()

    async def start_tcp(self, port: int, ssl_context: ssl.SSLContext) -> None:
        """Serve on 127.0.0.1 with TLS, like `dockerd --tlsverify -H tcp://...`."""
        await self._setup()
        assert self._runner is not None
        await web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=ssl_context).start()

    async def _setup(self) -> None:
        app = web.Application()
        r = app.router
        r.add_get("/version", self.version)
        r.add_get("/{v}/version", self.version)
        r.add_post("/{v}/containers/create", self.create)
        r.add_post("/{v}/containers/{id}/start", self.start_container)
        r.add_get("/{v}/containers/json", self.list)
        r.add_get("/{v}/containers/{id}/json", self.inspect)
        r.add_delete("/{v}/containers/{id}", self.delete)
        r.add_get("/{v}/networks", self.network_list)
        r.add_get("/{v}/networks/{id}", self.network)
        r.add_post("/{v}/networks/{id}/connect", self.connect)
        r.add_post("/{v}/containers/{id}/stop", self.stop_container)
        r.add_post("/{v}/containers/{id}/restart", self.restart_container)
        r.add_get("/{v}/events", self.events)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()

    async def stop(self) -> None:
        """Stop serving (Docker went away): open event streams end."""
        for q in self._streams:
            q.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- helpers ------------------------------------------------------------------

    def find(self, ref: str) -> FakeContainer | None:
        for c in self.containers.values():
            if ref in (c.id, c.name):
                return c
        matches = [c for c in self.containers.values() if c.id.startswith(ref)]
        return matches[0] if len(matches) == 1 else None

    def running(self) -> list[FakeContainer]:
        return [c for c in self.containers.values() if c.state == "running"]

    # ---- what happens to containers (also callable directly by tests) ----------------

    def emit(self, typ: str, action: str, actor: str, **attrs: str) -> None:
        now = time.time_ns()
        ev = {
            "Type": typ,
            "Action": action,
            "Actor": {"ID": actor, "Attributes": attrs},
            "time": now // 1_000_000_000,
            "timeNano": now,
        }
        for q in self._streams:
            q.put_nowait(ev)

    def launch(self, c: FakeContainer) -> None:
        """Start `c`: a new pid, an address on the bridge, events, hooks."""
        self._pids += 1
        c.pid, c.state = self._pids, "running"
        if c.mode == "bridge" and not c.ip:
            self._ips += 1
            c.ip = str(BRIDGE[self._ips])
        for hook in self.hooks:
            hook("start", c)
        if c.mode == "bridge":
            self.emit("network", "connect", "bridge", container=c.id)
        self.emit("container", "start", c.id, name=c.name)

    def halt(self, c: FakeContainer, *, destroy: bool = False) -> None:
        """Stop `c` (and remove it with `destroy`): events, hooks."""
        if c.state == "running":
            c.state = "exited"
            for hook in self.hooks:
                hook("stop", c)
            c.pid = 0
            self.emit("container", "die", c.id, name=c.name)
            if c.mode == "bridge":
                self.emit("network", "disconnect", "bridge", container=c.id)
        if destroy:
            self.containers.pop(c.id, None)
            self.emit("container", "destroy", c.id, name=c.name)

    def add(self, name: str, labels: dict[str, str], mode: str = "bridge") -> FakeContainer:
        """Create a container (what `POST /containers/create` does)."""
        cid = self.id_prefix + secrets.token_hex(32)[len(self.id_prefix) :]
        config = {"Image": "segd-busybox:latest", "Labels": labels}
        config["HostConfig"] = {"NetworkMode": mode}
        c = FakeContainer(cid, name, config, networks=[mode])
        self.containers[cid] = c
        return c

    # ---- handlers -----------------------------------------------------------------

    async def version(self, request: web.Request) -> web.Response:
        return _json({"ApiVersion": "1.41", "Version": "20.10.24"})

    async def create(self, request: web.Request) -> web.Response:
        config = json.loads(await request.read())
        name = request.query.get("name") or secrets.token_hex(6)
        self.requests.append(f"create {name}")
        if any(c.name == name for c in self.containers.values()):
            return _err(409, f'Conflict. The container name "/{name}" is already in use.')
        if config["Image"] not in self.images:
            return _err(404, f"No such image: {config['Image']}")
        mode = (config.get("HostConfig") or {}).get("NetworkMode") or "bridge"
        joined = mode.startswith("container:") and self.find(mode[10:]) is not None
        if mode not in self.network_names | {"host"} and not joined:
            return _err(404, f"network {mode} not found")
        cid = self.id_prefix + secrets.token_hex(32)[len(self.id_prefix) :]
        self.containers[cid] = FakeContainer(cid, name, config, networks=[mode])
        if self.create_delay:
            await asyncio.sleep(self.create_delay)
        return _json({"Id": cid, "Warnings": []}, status=201)

    async def start_container(self, request: web.Request) -> web.Response:
        c = self.find(request.match_info["id"])
        if c is None:
            return _err(404, f"No such container: {request.match_info['id']}")
        self.starts += 1
        if self.fail_start is not None and self.starts == self.fail_start:
            return _err(500, "OCI runtime create failed: exec: not found")
        if c.state != "running":
            self.launch(c)
        return web.Response(status=204)

    async def stop_container(self, request: web.Request) -> web.Response:
        c = self.find(request.match_info["id"])
        if c is None:
            return _err(404, f"No such container: {request.match_info['id']}")
        self.halt(c)
        return web.Response(status=204)

    async def restart_container(self, request: web.Request) -> web.Response:
        c = self.find(request.match_info["id"])
        if c is None:
            return _err(404, f"No such container: {request.match_info['id']}")
        self.halt(c)
        self.launch(c)
        return web.Response(status=204)

    async def _held(self, hold: asyncio.Event | None) -> None:
        if hold is not None:
            self.held += 1
            await hold.wait()

    async def inspect(self, request: web.Request) -> web.Response:
        c = self.find(request.match_info["id"])
        if c is None:
            return _err(404, f"No such container: {request.match_info['id']}")
        answer = _json(
            {
                "Id": c.id,
                "Name": "/" + c.name,
                "State": {"Status": c.state, "Running": c.state == "running", "Pid": c.pid},
                "Config": {"Image": c.config["Image"], "Labels": c.labels},
                "HostConfig": {"NetworkMode": c.mode},
                "NetworkSettings": {
                    "Networks": {
                        n: {"IPAddress": c.ip if n == "bridge" else "", "GlobalIPv6Address": ""}
                        for n in c.networks
                    }
                },
            }
        )
        await self._held(self.hold_inspect.get(c.id))
        return answer

    async def list(self, request: web.Request) -> web.Response:
        show_all = request.query.get("all") in ("1", "true", "True")
        wanted = json.loads(request.query.get("filters") or "{}").get("label", [])
        out = []
        for c in self.containers.values():
            if not show_all and c.state != "running":
                continue
            if not all(c.labels.get(k) == v for k, _, v in (w.partition("=") for w in wanted)):
                continue
            out.append(
                {
                    "Id": c.id,
                    "Names": ["/" + c.name],
                    "State": c.state,
                    "Status": "Up 1 second" if c.state == "running" else "Created",
                    "Labels": c.labels,
                }
            )
        await self._held(self.hold_list)
        return _json(out)

    async def delete(self, request: web.Request) -> web.Response:
        c = self.find(request.match_info["id"])
        if c is None:
            return _err(404, f"No such container: {request.match_info['id']}")
        if self.fail_delete:
            return _err(500, "driver failed to remove root filesystem")
        force = request.query.get("force") in ("1", "true", "True")
        if c.state == "running" and not force:
            return _err(409, "You cannot remove a running container. Stop it first.")
        self.halt(c, destroy=True)
        return web.Response(status=204)

    async def network(self, request: web.Request) -> web.Response:
        name = request.match_info["id"]
        if name not in self.network_names:
            return _err(404, f"network {name} not found")
        return _json({"Id": name, "Name": name})

    async def network_list(self, request: web.Request) -> web.Response:
        nets = [
            {"Name": "bridge", "Driver": "bridge", "IPAM": {"Config": [{"Subnet": str(BRIDGE)}]}},
            {"Name": "host", "Driver": "host", "IPAM": {"Config": []}},
            {"Name": "none", "Driver": "null", "IPAM": {"Config": []}},
        ]
        return _json(nets)

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Docker's event stream: one JSON object per line, until the engine stops."""
        wanted = json.loads(request.query.get("filters") or "{}").get("type")
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._streams.add(q)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        try:
            await resp.prepare(request)
            while (ev := await q.get()) is not None:
                if not wanted or ev["Type"] in wanted:
                    await resp.write(json.dumps(ev).encode() + b"\n")
        except ConnectionResetError:
            pass
        finally:
            self._streams.discard(q)
        return resp

    async def connect(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        c = self.find(body["Container"])
        if c is None:
            return _err(404, f"No such container: {body['Container']}")
        c.networks.append(request.match_info["id"])
        return web.Response(status=200)
