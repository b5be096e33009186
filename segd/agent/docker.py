"""What the agent learns from Docker: containers, their keys, IPs and namespaces.

`parse_container` is pure (inspect JSON -> ContainerInfo). `DockerWatcher` owns
the event stream: it subscribes *before* each full reconcile so no event falls
between them, and resubscribes (with a fresh reconcile) whenever the stream ends
— Docker restarted, socket gone and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import aiodocker
import aiohttp
import msgspec

from segd import contract, log
from segd.agent.events import ContainerInfo, DockerEvent, from_docker
from segd.agent.retry import Backoff

_log = log.get(__name__)


def _ips(networks: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    ips: set[str] = set()
    per_net: dict[str, str] = {}
    for name, net in networks.items():
        v4 = (net or {}).get("IPAddress") or ""
        v6 = (net or {}).get("GlobalIPv6Address") or ""
        per_net[name] = v4
        for ip in (v4, v6):
            if ip:
                try:
                    ips.add(str(ipaddress.ip_address(ip)))
                except ValueError:
                    continue
    return sorted(ips), per_net


def parse_container(data: Mapping[str, Any]) -> ContainerInfo | None:
    """Inspect JSON -> ContainerInfo; None when the container is not running."""
    state = data.get("State") or {}
    pid = int(state.get("Pid") or 0)
    if not state.get("Running") or pid <= 0:
        return None
    config = data.get("Config") or {}
    labels: Mapping[str, str] = config.get("Labels") or {}
    host_config = data.get("HostConfig") or {}
    net_mode = str(host_config.get("NetworkMode") or "")
    settings = data.get("NetworkSettings") or {}
    ips, per_net = _ips(settings.get("Networks") or {})
    requested = contract.requested_labels(labels)
    return ContainerInfo(
        id=str(data["Id"]),
        name=str(data.get("Name") or "").lstrip("/"),
        pid=pid,
        ips=ips,
        networks=per_net,
        pairing_key=contract.pairing_key(labels),
        requested_labels=requested,
        host_network=net_mode == "host",
        network_mode=net_mode,
    )


def bridge_subnets(networks: Sequence[Mapping[str, Any]]) -> list[str]:
    """Subnets of every Docker bridge network (docker0 and user-defined)."""
    out: set[str] = set()
    for net in networks:
        if net.get("Driver") != "bridge":
            continue
        for cfg in (net.get("IPAM") or {}).get("Config") or []:
            subnet = (cfg or {}).get("Subnet")
            if subnet:
                try:
                    out.add(str(ipaddress.ip_network(subnet, strict=False)))
                except ValueError:
                    continue
    return sorted(out)


EventHandler = Callable[[DockerEvent], Awaitable[None]]
ResyncHandler = Callable[[], Awaitable[None]]


class DockerWatcher:
    """Docker access for the agent: inspect, list, and a self-healing event stream."""

    def __init__(self, url: str, *, backoff_max: float = 10.0) -> None:
        self._url = url
        self._backoff_max = backoff_max
        self._docker: aiodocker.Docker | None = None
        self.connected = asyncio.Event()

    def _client(self) -> aiodocker.Docker:
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self._url)
        return self._docker

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    async def inspect(self, container_id: str) -> ContainerInfo | None:
        """The running container, or None when it is gone or stopped."""
        try:
            c = await self._client().containers.get(container_id)
        except aiodocker.DockerError as e:
            if e.status == 404:
                return None
            raise
        return parse_container(c._container)

    async def running(self) -> list[ContainerInfo]:
        out: list[ContainerInfo] = []
        for c in await self._client().containers.list():
            info = await self.inspect(c.id)
            if info is not None:
                out.append(info)
        return out

    async def subnets(self) -> list[str]:
        nets = await self._client().networks.list()
        return bridge_subnets(nets)

    async def network(self, name: str) -> dict[str, Any] | None:
        """A network's inspect document, or None when there is none of that name."""
        try:
            net = await self._client().networks.get(name)
            return dict(await net.show())
        except aiodocker.DockerError as e:
            if e.status == 404:
                return None
            raise

    async def create_network(self, body: dict[str, Any]) -> None:
        await self._client().networks.create(body)

    async def watch(self, on_event: EventHandler, on_resync: ResyncHandler) -> None:
        """Run forever: subscribe, resync, deliver events; reconnect on loss."""
        backoff = Backoff(self._backoff_max)
        while True:
            try:
                # The events request is open (its answer has begun) before the
                # resync, so nothing between the two is lost.
                async with self._client()._query(
                    "events", params={"filters": {"type": ["container", "network"]}}, timeout=None
                ) as resp:
                    try:
                        self.connected.set()
                        _log.info("docker.stream.up")
                        await self._guard("resync", on_resync())
                        backoff.reset()
                        while line := await resp.content.readline():
                            ev = _event(line)
                            if ev is not None:
                                await self._guard("event", on_event(ev))
                    finally:
                        resp.close()
                _log.warning("docker.stream.ended")
            except (
                aiodocker.DockerError,
                aiohttp.ClientError,
                OSError,
                TimeoutError,
            ) as e:
                _log.warning("docker.unreachable", error=str(e) or type(e).__name__)
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    await self.close()
            await backoff.wait()

    @staticmethod
    async def _guard(what: str, coro: Awaitable[None]) -> None:
        """One failed event or resync is logged; the stream and the periodic
        reconcile carry on (and retry what failed)."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as e:
            _log.error("docker.handler_failed", what=what, error=repr(e))


def _event(line: bytes) -> DockerEvent | None:
    """One line of the event stream as the agent's event (None: ignored or not JSON)."""
    try:
        raw = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return None
    return from_docker(raw) if isinstance(raw, dict) else None
