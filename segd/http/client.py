"""The typed, synchronous admin client of segd's APIs (urllib, no extra deps).

`Client(server, token, peer=...)` sends one request at a time with the admin
token; a body is a msgspec Struct (or any msgspec-encodable value), an answer
is the raw JSON (`call`) or decoded strictly into a type (`get`). Every
failure is a `ClientError` of one line, worded with the peer's name: the
server's `message` for an error answer, else what went wrong on the way.
`segd ctl`, `segd ctl orch`, the demo and the test and benchmark stacks use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 30.0
_enc = msgspec.json.Encoder()


class ClientError(Exception):
    """A failure to report as one line; `status` is the exit code a CLI uses,
    `http` the answer's status and `code` its error code (0 and "" without one)."""

    def __init__(self, message: str, status: int = 1, *, http: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.http = http
        self.code = code


@dataclasses.dataclass(frozen=True)
class Peer:
    """How failures name the other side: `cannot reach {reach} at URL`,
    `{name} at URL: ...`, `{short} answered HTTP 502 ...`."""

    reach: str
    name: str
    short: str


SERVER = Peer("segd server", "segd server", "server")
ORCHESTRATOR = Peer("the orchestrator", "orchestrator", "orchestrator")


class Client:
    def __init__(
        self,
        server: str,
        token: str,
        *,
        peer: Peer = SERVER,
        ca_file: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.server = server.rstrip("/")
        if not self.server.startswith(("http://", "https://")):
            raise ClientError(f"invalid server URL {server!r}: expected http:// or https://", 2)
        self.peer = peer
        self._token = token
        self._timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        if self.server.startswith("https://"):
            try:
                self._ssl = ssl.create_default_context(cafile=ca_file or None)
            except (OSError, ssl.SSLError) as e:
                raise ClientError(f"cannot load CA file {ca_file}: {e}") from None

    def lines(self, path: str, query: dict[str, str | int] | None = None) -> Iterator[bytes]:
        """GET a streamed answer (server-sent events, JSON lines) line by line, as
        it comes; the connection is closed when the caller stops iterating."""
        with self._open(self._request("GET", path, query)) as resp:
            yield from resp

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        query: dict[str, str | int] | None = None,
    ) -> bytes:
        """Send one request; the raw JSON answer (b"" for 204)."""
        data = None if body is None else _enc.encode(body)
        req = self._request(method, path, query, data)
        req.add_header("Accept", "application/json")
        with self._open(req) as resp:
            out: bytes = resp.read()
            return out

    def _request(
        self,
        method: str,
        path: str,
        query: dict[str, str | int] | None,
        data: bytes | None = None,
    ) -> urllib.request.Request:
        url = self.server + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        # http or https only (checked when the client was made): no file: or other schemes.
        req = urllib.request.Request(url, data=data, method=method)  # noqa: S310
        req.add_header("Authorization", f"Bearer {self._token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        return req

    @contextlib.contextmanager
    def _open(self, req: urllib.request.Request) -> Iterator[Any]:
        """The answer to `req`, read within the block; any failure (an error
        answer, an unreachable peer, a timeout while reading) as a `ClientError`."""
        p = self.peer
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._ssl) as resp:  # noqa: S310
                yield resp
        except urllib.error.HTTPError as e:
            raise _answered(e, p) from None
        except urllib.error.URLError as e:
            reason = getattr(e.reason, "strerror", None) or str(e.reason)
            raise ClientError(f"cannot reach {p.reach} at {self.server}: {reason}") from None
        except (TimeoutError, OSError) as e:
            raise ClientError(f"{p.name} at {self.server}: {e}") from None

    def get(
        self,
        t: type[T],
        method: str,
        path: str,
        body: object = None,
        query: dict[str, str | int] | None = None,
    ) -> T:
        """Send one request; its answer decoded as `t`."""
        raw = self.call(method, path, body, query)
        try:
            return msgspec.json.decode(raw, type=t)
        except (msgspec.DecodeError, msgspec.ValidationError):
            raise ClientError(
                f"{self.peer.name} at {self.server} sent a malformed answer"
            ) from None

    def json(self, method: str, path: str, body: object = None) -> Any:
        """Send one request; its answer as plain JSON values (None for 204)."""
        raw = self.call(method, path, body)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ClientError(
                f"{self.peer.name} at {self.server} sent a malformed answer"
            ) from None


def _answered(e: urllib.error.HTTPError, peer: Peer) -> ClientError:
    try:
        doc = json.loads(e.read())
        message, code = str(doc["message"]), str(doc.get("error", ""))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ClientError(f"{peer.short} answered HTTP {e.code} {e.reason}", http=e.code)
    return ClientError(message.replace("\n", " "), http=e.code, code=code)
