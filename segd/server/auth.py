"""Who is calling: admins by bearer token, agents by signed requests.

An agent signs method, path with query, timestamp, nonce and the body's
SHA-256 (`crypto.request_string`). The server refuses a timestamp more than
`request_skew_s` behind its clock or `request_future_skew_s` ahead of it, a
nonce it has already accepted within that window, and a timestamp at or before
the host's replay floor (`replay.ReplayMarks`: the process start, or the latest
request stamped ahead that an earlier process took), so a request taken before
a restart cannot be taken again after it, when the nonce cache is empty.
"""

from __future__ import annotations

import collections
import math
import re

from aiohttp import web

from segd import crypto
from segd.errors import InvalidInput, Unauthorized
from segd.server.replay import RESOLUTION
from segd.server.service import Service

_NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}\Z")


class NonceCache:
    """Nonces accepted in the last `ttl` seconds, per host."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._seen: set[tuple[str, str]] = set()
        self._order: collections.deque[tuple[float, tuple[str, str]]] = collections.deque()

    def add(self, host_id: str, nonce: str, now: float) -> bool:
        """Remember the nonce; False when it was already seen (a replay)."""
        while self._order and self._order[0][0] <= now:
            self._seen.discard(self._order.popleft()[1])
        key = (host_id, nonce)
        if key in self._seen:
            return False
        self._seen.add(key)
        self._order.append((now + self.ttl, key))
        return True

    def __len__(self) -> int:
        return len(self._seen)


def require_admin(svc: Service, request: web.Request) -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("admin API needs 'Authorization: Bearer <token>'")
    # Header bytes that are not UTF-8 arrive as lone surrogates, which cannot be
    # hashed; no token segd issues has anything but printable ASCII.
    if not (token.isascii() and token.isprintable()) or not svc.is_admin(token):
        raise Unauthorized("invalid admin token")


async def verify_agent(svc: Service, nonces: NonceCache, request: web.Request, body: bytes) -> str:
    """Check a signed agent request; return the calling host's id. A request
    stamped ahead of the server clock raises the host's replay mark durably
    before it is taken."""
    h = request.headers
    host_id = h.get(crypto.HDR_AGENT, "")
    ts_text = h.get(crypto.HDR_TS, "")
    nonce = h.get(crypto.HDR_NONCE, "")
    sig_text = h.get(crypto.HDR_SIG, "")
    if not (host_id and ts_text and nonce and sig_text):
        raise Unauthorized("agent request is not signed", code="unsigned_request")
    auth = svc.check_host(host_id)
    now = svc.clock()
    ts = _timestamp(svc, host_id, ts_text, now)
    if not _NONCE_RE.match(nonce):
        raise Unauthorized("invalid request nonce", code="bad_nonce")
    try:
        sig = crypto.b64d(sig_text)
    except InvalidInput:
        sig = b""
    msg = crypto.request_string(request.method, request.raw_path, ts_text, nonce, body)
    # On the loop's thread: the check takes about 40 µs, and handing it to a worker
    # thread cost the loop as much again in handoffs.
    if len(sig) != 64 or not crypto.verify(auth.verify_key, msg, sig):
        raise Unauthorized("request signature does not verify", code="bad_request_signature")
    if not nonces.add(host_id, nonce, now):
        raise Unauthorized("request nonce was already used", code="replayed_request")
    if svc.marks.must_persist(host_id, ts, now):
        await svc.persist_mark(host_id, ts)
    return host_id


def _timestamp(svc: Service, host_id: str, ts_text: str, now: float) -> float:
    """The request's timestamp, refused when it is not a number, too old, too far
    ahead, or not after what the host's replay mark allows."""
    try:
        ts = float(ts_text)
    except ValueError:
        ts = math.nan
    if not math.isfinite(ts):
        raise Unauthorized("invalid request timestamp", code="bad_timestamp")
    cfg = svc.cfg
    if ts < now - cfg.request_skew_s:
        raise Unauthorized(
            f"request timestamp is more than {cfg.request_skew_s:g}s behind server time",
            code="stale_request",
        )
    if ts > now + cfg.request_future_skew_s + RESOLUTION:
        raise Unauthorized(
            f"request timestamp is more than {cfg.request_future_skew_s:g}s ahead of server time",
            code="stale_request",
        )
    if ts <= svc.marks.floor(host_id):
        raise Unauthorized(
            "request timestamp is not after the server start or the last request taken before it",
            code="stale_request",
        )
    return ts
