"""The agent's client for the segmentation server: every request signed.

Errors are sorted in two: `Denied` (the server said no: a 4xx with a reason, which
retrying will not change) and `ServerUnavailable` (unreachable, 5xx, 429 rate
limited, timeouts: retry with jittered backoff).
"""

from __future__ import annotations

import ssl
import time

import aiohttp
import msgspec
import nacl.signing

from segd import crypto
from segd.wire import (
    AgentReport,
    Error,
    FlowBatchIn,
    MeshJoined,
    MeshJoinIn,
    PairIn,
    Registered,
    RegisterIn,
    SidecarIn,
    SidecarsIn,
    SignedInstructions,
    UnpairIn,
)


class Denied(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


class ServerUnavailable(Exception):
    pass


class PairAnswer(msgspec.Struct, frozen=True):
    """The server's answer to a pairing: the `version` of the host's instructions
    the workload first appears in, which the long-poll brings. Earlier servers
    sent the signed instructions themselves; those are taken too."""

    workload_id: str
    labels: dict[str, str]
    instructions: SignedInstructions | None = None
    version: int = 0


_ERR = msgspec.json.Decoder(Error)
_PAIR = msgspec.json.Decoder(PairAnswer)
FLOWS_TIMEOUT_S = 30.0  # a flow batch's request, waiting its turn on the server included


def _error_of(status: int, body: bytes) -> Denied:
    try:
        e = _ERR.decode(body)
        return Denied(status, e.error, e.message)
    except msgspec.DecodeError:
        return Denied(status, "http_error", f"HTTP {status}")


class ServerClient:
    def __init__(
        self,
        base_url: str,
        signing_key: nacl.signing.SigningKey,
        host_id: str = "",
        *,
        ca_file: str = "",
        timeout: float = 10.0,
    ) -> None:
        self.base = base_url.rstrip("/")
        self.key = signing_key
        self.host_id = host_id
        ssl_ctx: ssl.SSLContext | bool = True
        if ca_file:
            ssl_ctx = ssl.create_default_context(cafile=ca_file)
        self._ssl = ssl_ctx
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=64),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        signed: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109 - per-request HTTP timeout
    ) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body else {}
        if signed:
            headers.update(
                crypto.sign_request(self.key, self.host_id, method, path, body, time.time())
            )
        try:
            async with self._sess().request(
                method,
                self.base + path,
                data=body or None,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout or self._timeout),
            ) as resp:
                data = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise ServerUnavailable(str(e) or type(e).__name__) from None
        if status >= 500 or status == 429:
            raise ServerUnavailable(f"server answered {status}: {_error_of(status, data).message}")
        if status >= 400:
            raise _error_of(status, data)
        return status, data

    async def register(self, activation_code: str, hostname: str) -> Registered:
        body = msgspec.json.encode(
            RegisterIn(
                activation_code=activation_code,
                public_key=crypto.b64e(bytes(self.key.verify_key)),
                hostname=hostname,
            )
        )
        _, data = await self._request("POST", "/v1/agent/register", body, signed=False)
        return msgspec.json.decode(data, type=Registered)

    async def pair(self, req: PairIn) -> PairAnswer:
        _, data = await self._request("POST", "/v1/agent/pair", msgspec.json.encode(req))
        return _PAIR.decode(data)

    async def unpair(self, container_id: str) -> None:
        await self._request(
            "POST", "/v1/agent/unpair", msgspec.json.encode(UnpairIn(container_id=container_id))
        )

    async def sidecars(self, items: list[SidecarIn]) -> None:
        """Replace the host's list of sidecars on the server."""
        body = msgspec.json.encode(SidecarsIn(sidecars=items))
        await self._request("PUT", "/v1/agent/sidecars", body)

    async def join_mesh(self, public_key: str, endpoint: str) -> MeshJoined:
        """Join the segd mesh (again): the host's subnet and the pool."""
        body = msgspec.json.encode(MeshJoinIn(public_key=public_key, endpoint=endpoint))
        _, data = await self._request("PUT", "/v1/agent/mesh", body)
        return msgspec.json.decode(data, type=MeshJoined)

    async def report(self, event: str, container_id: str = "", detail: str = "") -> None:
        body = msgspec.json.encode(
            AgentReport(event=event, container_id=container_id, detail=detail)
        )
        await self._request("POST", "/v1/agent/report", body)

    async def flows(self, batch: FlowBatchIn) -> None:
        """Send flow records (`POST /v1/agent/flows`). The server may hold a batch
        for its turn (up to 10 s, and behind the pairings it answers), so this
        waits longer than other requests; a batch sent again after a timeout has
        the same name, and the server does not keep it twice."""
        body = msgspec.json.encode(batch)
        await self._request("POST", "/v1/agent/flows", body, timeout=FLOWS_TIMEOUT_S)

    async def instructions(self, since: int, wait: float) -> SignedInstructions | None:
        """Long-poll: new signed instructions after `since`, or None on timeout."""
        path = f"/v1/agent/instructions?since={since}&wait={wait:g}"
        status, data = await self._request("GET", path, timeout=wait + self._timeout)
        if status == 204 or not data:
            return None
        return msgspec.json.decode(data, type=SignedInstructions)
