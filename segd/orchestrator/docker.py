"""Docker Engine access for the orchestrator: one aiodocker client per node.

`run` creates and starts a container from a profile, carrying the pairing key
and requested labels as Docker labels (what the agent reads). A failed run
leaves nothing behind: what was made is removed before the error is raised.
`change` replaces a container (labels are fixed at create): the new one is
started first and the old one removed only once the new one runs, so a failure
leaves the old container untouched.

Docker failures become `SegdError`s that name the node: `node_unreachable`
(503) when the engine cannot be reached or does not answer in time,
`image_not_found` / `network_not_found` / `docker_refused` (422) when it refuses
the request, `docker_error` (502) when it fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import ssl
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import aiodocker
import aiohttp
import msgspec

from segd import contract, log
from segd.errors import InvalidInput, SegdError
from segd.orchestrator import validate, wire
from segd.orchestrator.model import ProfileRecord

MANAGED_LABEL = contract.ORCH_PREFIX + "managed"
PROFILE_LABEL = contract.ORCH_PREFIX + "profile"

_log = log.get(__name__)
T = TypeVar("T")


class LiveContainer(msgspec.Struct, frozen=True):
    """A managed container as the node reports it."""

    id: str
    name: str
    state: str
    status: str
    labels: dict[str, str]


class NodeError(SegdError):
    """A Docker call failed; `unknown` when it may have taken effect anyway."""

    def __init__(self, message: str, *, code: str, status: int, unknown: bool = False):
        super().__init__(message, code=code, status=status)
        self.unknown = unknown


class OldNotRemoved(SegdError):
    """`change` started the new container but could not remove the old one."""

    code = "old_not_removed"
    status = 502

    def __init__(self, message: str, new: LiveContainer):
        super().__init__(message)
        self.new = new


def container_labels(profile: ProfileRecord, extra: Mapping[str, str]) -> dict[str, str]:
    labels = dict(extra)
    labels.update(contract.key_labels(profile.pairing_key, profile.labels))
    labels[PROFILE_LABEL] = profile.name
    labels[MANAGED_LABEL] = "1"
    return labels


def container_config(profile: ProfileRecord, extra: Mapping[str, str]) -> dict[str, Any]:
    """The Docker create body for a profile; the first network is the primary one."""
    config: dict[str, Any] = {
        "Image": profile.image,
        "Env": [f"{k}={v}" for k, v in sorted(profile.env.items())],
        "Labels": container_labels(profile, extra),
        "HostConfig": {},
    }
    if profile.command:
        config["Cmd"] = list(profile.command)
    if profile.networks:
        first = profile.networks[0]
        config["HostConfig"]["NetworkMode"] = first
        config["NetworkingConfig"] = {"EndpointsConfig": {first: {}}}
    return config


def ssl_context(node: wire.Node) -> ssl.SSLContext | None:
    """The client TLS context of a tcp:// node, from its cert/key/CA files."""
    if not (node.tls_cert or node.tls_key or node.tls_ca):
        return None
    try:
        ctx = ssl.create_default_context(cafile=node.tls_ca or None)
        if node.tls_cert:
            ctx.load_cert_chain(node.tls_cert, node.tls_key)
    except FileNotFoundError as e:
        raise InvalidInput(f"node {node.name!r}: TLS file not found: {e.filename}") from None
    except (OSError, ssl.SSLError) as e:
        raise InvalidInput(f"node {node.name!r}: unusable TLS files: {e}") from None
    return ctx


def _live(data: Mapping[str, Any]) -> LiveContainer:
    """From either a list entry or an inspect answer."""
    state = data.get("State")
    if isinstance(state, Mapping):
        status = str(state.get("Status") or "")
        return LiveContainer(
            id=str(data["Id"]),
            name=str(data.get("Name") or "").lstrip("/"),
            state=status,
            status=status,
            labels=dict((data.get("Config") or {}).get("Labels") or {}),
        )
    names = data.get("Names") or [""]
    return LiveContainer(
        id=str(data["Id"]),
        name=str(names[0]).lstrip("/"),
        state=str(state or ""),
        status=str(data.get("Status") or ""),
        labels=dict(data.get("Labels") or {}),
    )


@dataclasses.dataclass(slots=True)
class _Client:
    node: wire.Node
    docker: aiodocker.Docker
    connector: aiohttp.BaseConnector | None  # ours to close (tcp nodes)


class DockerNodes:
    """aiodocker clients per node, created on first use and closed by `close`."""

    def __init__(self, *, timeout: float = 30.0) -> None:
        self._timeout = timeout
        self._clients: dict[str, _Client] = {}

    async def _client(self, node: wire.Node) -> aiodocker.Docker:
        cached = self._clients.get(node.name)
        if cached is not None:
            if cached.node == node:
                return cached.docker
            await self.forget(node.name)
        ep = validate.endpoint(node.endpoint)
        timeout = aiohttp.ClientTimeout(total=self._timeout, connect=min(self._timeout, 10.0))
        connector: aiohttp.BaseConnector | None = None
        if ep.scheme == "unix":
            docker = aiodocker.Docker(url=node.endpoint, timeout=timeout)
        else:
            ctx = ssl_context(node)
            host = f"[{ep.host}]" if ":" in ep.host else ep.host
            url = f"{'https' if ctx else 'http'}://{host}:{ep.port}"
            # Our own connector: aiodocker would otherwise consult DOCKER_TLS_VERIFY.
            connector = aiohttp.TCPConnector(ssl=ctx if ctx is not None else True)
            docker = aiodocker.Docker(url=url, connector=connector, timeout=timeout)
        self._clients[node.name] = _Client(node, docker, connector)
        return docker

    async def forget(self, name: str) -> None:
        """Close the client of a node (after it is removed or changed)."""
        cached = self._clients.pop(name, None)
        if cached is not None:
            await cached.docker.close()
            if cached.connector is not None:
                await cached.connector.close()

    async def close(self) -> None:
        for name in list(self._clients):
            await self.forget(name)

    async def _call(self, node: wire.Node, what: str, aw: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                return await aw
        except TimeoutError:
            raise NodeError(
                f"node {node.name!r} ({node.endpoint}) did not answer within"
                f" {self._timeout:g}s ({what})",
                code="node_unreachable",
                status=503,
                unknown=True,
            ) from None
        except aiodocker.DockerError as e:
            raise _docker_error(node, what, e) from None
        except (aiohttp.ClientError, OSError) as e:
            raise _unreachable(node, str(e) or type(e).__name__, e) from None

    # ---- operations ---------------------------------------------------------------

    async def run(
        self, node: wire.Node, profile: ProfileRecord, name: str, extra: Mapping[str, str]
    ) -> LiveContainer:
        """Create and start a container; on any failure remove what was made."""
        docker = await self._client(node)
        config = container_config(profile, extra)
        container_id = ""
        try:
            created = await self._call(node, "create", docker.containers.create(config, name=name))
            container_id = created.id
            for net in profile.networks[1:]:
                network = await self._call(node, "network", docker.networks.get(net))
                await self._call(node, "connect", network.connect({"Container": container_id}))
            await self._call(node, "start", created.start())
            info = await self._call(node, "inspect", docker.containers.get(container_id))
        except BaseException as e:
            if container_id:
                await self._cleanup(node, docker, container_id, profile.name)
            elif not (isinstance(e, NodeError) and not e.unknown):
                # The create may have happened without us hearing back.
                await self._cleanup(node, docker, name, profile.name)
            raise
        return _live(info._container)

    async def _cleanup(
        self, node: wire.Node, docker: aiodocker.Docker, ref: str, profile: str
    ) -> None:
        """Remove a half-made container (by id or name), but only if it is ours."""
        try:
            async with asyncio.timeout(self._timeout):
                c = await docker.containers.get(ref)
                labels = c._container.get("Config", {}).get("Labels") or {}
                if labels.get(MANAGED_LABEL) != "1" or labels.get(PROFILE_LABEL) != profile:
                    return
                await c.delete(force=True)
            _log.info("container.cleaned_up", node=node.name, container=ref)
        except aiodocker.DockerError as e:
            if e.status != 404:
                _log.error(
                    "container.cleanup_failed", node=node.name, container=ref, error=e.message
                )
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            _log.error("container.cleanup_failed", node=node.name, container=ref, error=str(e))

    async def rm(self, node: wire.Node, container_id: str) -> bool:
        """Force-remove; False when the container was already gone."""
        docker = await self._client(node)

        async def delete() -> bool:
            try:
                await docker.containers.container(container_id).delete(force=True)
            except aiodocker.DockerError as e:
                if e.status == 404:
                    return False
                raise
            return True

        return await self._call(node, "remove", delete())

    async def ps(self, node: wire.Node) -> list[LiveContainer]:
        """Every container on the node that carries the managed label."""
        docker = await self._client(node)
        filters = json.dumps({"label": [f"{MANAGED_LABEL}=1"]})
        items = await self._call(node, "list", docker.containers.list(all="1", filters=filters))
        return [_live(c._container) for c in items]

    async def change(
        self,
        node: wire.Node,
        old_id: str,
        profile: ProfileRecord,
        name: str,
        extra: Mapping[str, str],
    ) -> LiveContainer:
        """Start a container of `profile`, then remove `old_id`.

        A failed start leaves the old container untouched; a failed removal
        raises `OldNotRemoved` carrying the new, running container.
        """
        new = await self.run(node, profile, name, extra)
        try:
            await self.rm(node, old_id)
        except SegdError as e:
            raise OldNotRemoved(
                f"new container {new.id[:12]} is running but the old one {old_id[:12]}"
                f" could not be removed: {e.message}",
                new,
            ) from None
        return new


def _unreachable(node: wire.Node, detail: str, cause: BaseException | None) -> NodeError:
    # A refused connection means nothing was sent; anything else may have been.
    return NodeError(
        f"node {node.name!r} is unreachable at {node.endpoint}: {detail}",
        code="node_unreachable",
        status=503,
        unknown=not isinstance(cause, aiohttp.ClientConnectorError),
    )


def _docker_error(node: wire.Node, what: str, e: aiodocker.DockerError) -> NodeError:
    msg = str(e.message).strip()
    if e.status == 900:  # aiodocker: the request failed before an answer
        cause = e.__context__
        detail = msg.rsplit("[", 1)[-1].rstrip("]") or msg
        if isinstance(cause, aiohttp.ClientConnectorError) and cause.os_error.errno:
            detail = os.strerror(cause.os_error.errno).lower()
        return _unreachable(node, detail, cause)
    low = msg.lower()
    if e.status == 404 and low.startswith("no such image"):
        return NodeError(
            f"image not found on node {node.name!r}: {msg} (the orchestrator never pulls;"
            " load the image on the node first)",
            code="image_not_found",
            status=422,
        )
    if e.status == 404 and (what == "network" or "network" in low):
        return NodeError(
            f"network not found on node {node.name!r}: {msg}", code="network_not_found", status=422
        )
    if e.status < 500:
        return NodeError(
            f"node {node.name!r} refused to {what}: {msg}", code="docker_refused", status=422
        )
    return NodeError(f"node {node.name!r} failed to {what}: {msg}", code="docker_error", status=502)
