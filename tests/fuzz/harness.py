"""The server under fuzz: a populated in-process server, requests drawn for any
route of the route table, and the invariants every answer must keep.

    env = await populate(api, clock)
    req = data.draw(request_for(env, route))
    await exchange(env, req)        # sends it and checks every invariant

Invariants: no 5xx, no hang; a refusal is a 4xx `{"error", "message"}` with a
one-line message and writes nothing a user can see (rules, profiles, keys and
their use counts, workloads, hosts, audit), except the audit row a refused
pairing or registration leaves by design; a success is the route's status and
decodes as its answer type; after any write, every host's instructions still
render as an nftables script.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import msgspec
import nacl.signing
import yarl
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from segd import crypto
from segd.firewall import render
from segd.firewall.plan import Plan
from segd.server import guard, pairing, tokens
from segd.server.api import ROUTES, Route
from tests.api.conftest import Admin, Agent, Clock, register_agent
from tests.fuzz import strategies as fz

LONGPOLL_S = 1.0  # the fuzzed server's longpoll_timeout_s (the smallest allowed)
# The fuzzed servers' rate_limit_burst: the fuzzers send refused credentials by the
# thousand from one address, and each must meet the check it aims at, not the rate
# limit (tests/api/test_flood.py pins the limit).
FUZZ_BURST = 1_000_000
ANSWER_TIMEOUT_S = LONGPOLL_S + 10.0

# Refusals that are audited by design: route path -> (audit events, error codes).
PAIR_CODES = frozenset(
    {
        tokens.MALFORMED,
        tokens.UNSUPPORTED,
        tokens.UNKNOWN_SIGNER,
        tokens.BAD_SIGNATURE,
        tokens.EXPIRED,
        pairing.UNKNOWN_KEY,
        pairing.KEY_PROFILE_MISMATCH,
        pairing.REVOKED,
        pairing.EXHAUSTED,
        pairing.PROFILE_DISABLED,
        pairing.INVALID_LABELS,
        pairing.LABEL_MISMATCH,
        pairing.IP_IN_USE,
        pairing.KEY_MISMATCH,
        pairing.HELD,
    }
)
AUDITED_REFUSALS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "/v1/agent/pair": (frozenset({"workload.paired", "workload.readdressed"}), PAIR_CODES),
    "/v1/agent/register": (
        frozenset({"host.registered"}),
        frozenset({"invalid_activation_code", "public_key_in_use"}),
    ),
}
# Of these, refusals audited in full only when first from their source in a while;
# the others are summed up in a `requests.refused` row, written in the background.
SUMMED_UP = frozenset({"/v1/agent/register"})
ROTATE_TOKEN = "/v1/admin-token/rotate"
_ERROR_CODE_RE = re.compile(r"^[a-z][a-z0-9_]{1,63}\Z")


@dataclasses.dataclass(frozen=True)
class Captured:
    """An accepted agent request, as an eavesdropper would have it."""

    at: float
    method: str
    path_qs: str
    body: bytes
    headers: tuple[tuple[str, str], ...]

    @property
    def nonce(self) -> str:
        return dict(self.headers)[crypto.HDR_NONCE]


@dataclasses.dataclass
class Env:
    """A server with two profiles, keys in every state, a rule, two live agents
    with a workload each, and a revoked one."""

    api: Admin
    clock: Clock
    a: Agent
    b: Agent
    revoked: Agent
    tokens: dict[str, str]  # which -> token: db, web, exhausted, revoked, disabled
    foreign_token: str  # signed by a key this server does not know
    codes: list[str]  # unused activation codes
    ids: dict[str, list[str]]  # path parameter name -> values that exist
    # host id -> the last request of that agent the server accepted, exactly as sent
    captured: dict[str, Captured] = dataclasses.field(default_factory=dict)

    @property
    def agents(self) -> list[Agent]:
        return [self.a, self.b]


async def populate(api: Admin, clock: Clock) -> Env:
    toks: dict[str, str] = {}
    toks["db"] = await api.setup_policy(profile="db", max_uses=1000, locked=("role", "app"))
    toks["web"] = await api.setup_policy(
        profile="web",
        labels={"role": "web", "app": "shop"},
        locked=("role",),
        max_uses=1000,
        on_mismatch="default",
    )
    toks["exhausted"] = (
        await api.ok("POST", "/v1/keys", {"profile": "db", "max_uses": 1}, status=201)
    )["token"]
    revoked = await api.ok("POST", "/v1/keys", {"profile": "web"}, status=201)
    await api.ok("POST", f"/v1/keys/{revoked['key_id']}/revoke")
    toks["revoked"] = revoked["token"]
    await api.ok(
        "POST",
        "/v1/profiles",
        {"name": "off", "labels": {"role": "x"}, "enabled": False},
        status=201,
    )
    toks["disabled"] = (await api.ok("POST", "/v1/keys", {"profile": "off"}, status=201))["token"]
    await api.ok(
        "POST",
        "/v1/rules",
        {
            "providers": [{"role": "db"}],
            "consumers": [{"role": "web"}],
            "services": ["tcp/5432"],
            "options": ["log"],
        },
        status=201,
    )
    await api.ok(
        "POST",
        "/v1/rules",
        {"providers": [{"app": "shop"}], "consumers": "any", "services": ["icmp", "udp/53"]},
        status=201,
    )
    a = await register_agent(api, clock, "host-a")
    b = await register_agent(api, clock, "host-b")
    gone = await register_agent(api, clock, "host-gone")
    await api.ok("POST", f"/v1/hosts/{gone.host_id}/revoke")
    assert (await a.pair("c-a1", toks["db"], ["10.9.0.1", "fd00::1"]))[0] == 200
    assert (await b.pair("c-b1", toks["web"], ["10.9.0.2"]))[0] == 200
    assert (await a.pair("c-ex", toks["exhausted"], ["10.9.0.3"]))[0] == 200
    other = nacl.signing.SigningKey(b"\x07" * 32)
    claims = tokens.parse(toks["db"])[0]
    foreign = tokens.issue(
        other,
        tokens.Claims(
            v=1,
            kid=claims.kid,
            pid=claims.pid,
            sk=crypto.key_id_of(other.verify_key),
            iat=claims.iat,
            exp=claims.exp,
        ),
    )
    codes = [
        (await api.ok("POST", "/v1/activation-codes", {}, status=201))["code"] for _ in range(3)
    ]
    env = Env(api, clock, a, b, gone, toks, foreign, codes, {})
    await refresh_ids(env)
    return env


async def refresh_ids(env: Env) -> None:
    api = env.api
    env.ids = {
        "id": [r["id"] for r in await api.ok("GET", "/v1/rules")]
        + [h["id"] for h in await api.ok("GET", "/v1/hosts")]
        + [w["id"] for w in await api.ok("GET", "/v1/workloads")],
        "name": [p["name"] for p in await api.ok("GET", "/v1/profiles")],
        "key_id": [k["key_id"] for k in await api.ok("GET", "/v1/keys")],
    }


# ---- requests ------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    route: Route
    method: str
    path_qs: str  # exactly as sent (already percent-encoded)
    body: bytes
    auth: str  # how it authenticates: admin, agent, none, or what broke it
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    signer: Agent | None = None  # sign the exact request with this agent at send time
    sig_damage: str = ""  # what to break in the signature headers

    def __repr__(self) -> str:
        body = self.body if len(self.body) < 300 else self.body[:300] + b"..."
        return (
            f"Request({self.method} {self.path_qs[:300]} auth={self.auth} "
            f"sig_damage={self.sig_damage!r} headers={self.headers!r} body={body!r})"
        )


def hints(env: Env) -> tuple[fz.Hints, fz.Hints]:
    """(good, bad): values for the wire types' fields the server should take,
    from what it holds, and hostile ones."""
    dims = env.api.svc.dims
    names = sorted(set(env.ids["name"]) | {"db", "web"})
    fresh = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
    good: dict[str, st.SearchStrategy[Any]] = {
        "name": st.one_of(fresh, fz.pick(names)),
        "profile": fz.pick(names),
        "labels": fz.good_labels(dims),
        "requested_labels": fz.good_labels(dims),
        "locked": st.lists(st.sampled_from(dims), max_size=2, unique=True),
        "providers": fz.good_selectors(dims),
        "consumers": fz.good_selectors(dims),
        "services": fz.good_services,
        "options": st.lists(st.just("log"), max_size=1),
        "description": st.one_of(
            st.just(""), st.text(st.characters(min_codepoint=32), max_size=50)
        ),
        "max_uses": st.one_of(st.none(), st.integers(1, 20)),
        "lifespan_s": st.integers(1, 7200),
        "enabled": st.booleans(),
        "container_id": st.one_of(
            st.sampled_from(["c-a1", "c-b1", "c-ex", "c-new"]),
            st.from_regex(r"c[0-9a-f]{1,12}", fullmatch=True),
        ),
        "pairing_key": st.sampled_from(
            [env.tokens["db"], env.tokens["web"], env.tokens["web"], *env.tokens.values()]
        ),
        "ips": fz.good_ips,
        "hostname": st.sampled_from(["host-x", "h.example.com"]),
        "public_key": st.binary(min_size=32, max_size=32).map(crypto.b64e),
        "activation_code": st.sampled_from(env.codes),
        "event": st.sampled_from(["tamper", "apply.failed", "x" * 64]),
        "detail": st.one_of(st.just(""), st.just("line one\nline two"), fz.text),
    }
    bad: dict[str, st.SearchStrategy[Any]] = {
        "name": st.one_of(fz.near(fresh), fz.text),
        "profile": st.one_of(fz.near(fz.pick(names)), fz.text),
        "labels": fz.bad_labels,
        "requested_labels": fz.bad_labels,
        "locked": st.lists(
            st.one_of(fz.near(st.sampled_from(dims)), fz.dimension, fz.text), min_size=1, max_size=3
        ),
        "providers": fz.bad_selectors,
        "consumers": fz.bad_selectors,
        "services": fz.bad_services,
        "options": st.lists(
            st.one_of(st.sampled_from(["fast", ""]), fz.near(st.just("log"))),
            min_size=1,
            max_size=2,
        ),
        "description": st.one_of(st.just("x" * 501), fz.text),
        "max_uses": st.sampled_from(fz.EXTREME_NUMBERS),
        "lifespan_s": st.sampled_from(fz.EXTREME_NUMBERS),
        "container_id": st.one_of(fz.near(good["container_id"]), fz.text),
        "pairing_key": st.one_of(
            st.just(env.foreign_token),
            st.sampled_from(sorted(env.tokens.values())).flatmap(_damaged_token),
            fz.text,
        ),
        "ips": fz.bad_ips,
        "hostname": st.one_of(fz.near(good["hostname"]), fz.text),
        "public_key": st.one_of(st.just(crypto.b64e(bytes(env.a.key.verify_key))), fz.text),
        "activation_code": fz.text,
        "event": st.one_of(fz.near(good["event"]), fz.text),
        "detail": st.one_of(st.just("x" * 2001), fz.text),
    }
    return good, bad


def _damaged_token(token: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(0, len(token) - 1).map(lambda i: token[:i]),
        st.integers(0, len(token) - 1).map(
            lambda i: token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]
        ),
        st.sampled_from([token + ".", token + "=", "." + token, token.replace(".", "..", 1)]),
    )


_PARAM_RE = re.compile(r"\{([a-z_]+)\}")


@st.composite
def path_qs(draw: st.DrawFn, env: Env, route: Route) -> str:
    def fill(m: re.Match[str]) -> str:
        known = env.ids.get(m.group(1), [])
        return str(draw(st.one_of(fz.path_value, fz.pick(known or ["x"]))))

    path = _PARAM_RE.sub(fill, route.path)
    pairs: list[tuple[str, str]] = []
    for q in route.query:
        if draw(st.booleans()):
            pairs.append((q.name, draw(fz.query_value)))
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from([*(q.name for q in route.query), "x", "limit", "%FF", ""]))
        pairs.append((name, draw(fz.query_value)))
    if route.path == "/v1/agent/instructions":
        # Long polls take up to LONGPOLL_S: keep most of them short.
        pairs = [(k, v if k != "wait" or draw(st.integers(0, 9)) == 0 else "0") for k, v in pairs]
    qs = "&".join(f"{k}={v}" if draw(st.integers(0, 9)) else k for k, v in pairs)
    return path + ("?" + qs if qs or draw(st.integers(0, 19)) == 0 else "")


@st.composite
def body_for(draw: st.DrawFn, env: Env, route: Route) -> bytes:
    if route.body is None:
        return draw(
            st.one_of(
                st.just(b""),
                st.just(b""),
                st.binary(max_size=64),
                fz.json_values.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
            )
        )
    valid = draw(fz.body(route.body, *hints(env)))
    if draw(st.booleans()):
        return encode(valid)
    fields = tuple(f.encode_name for f in msgspec.structs.fields(route.body))
    return draw(fz.mutated(valid, fields))


ADMIN_AUTH = [
    "lowercase_scheme",
    "missing",
    "scheme_only",
    "garbage",
    "basic",
    "token_only",
    "truncated",
    "extended",
]
SIG_DAMAGE = [
    "drop_host",
    "drop_ts",
    "drop_nonce",
    "drop_sig",
    "stale",
    "future",
    "before_start",
    "ts_garbage",
    "nonce_garbage",
    "nonce_replay",
    "replay",
    "sig_flip",
    "sig_truncate",
    "sig_padded",
    "sig_other_key",
    "other_host",
    "unknown_host",
    "revoked_host",
    "signed_other_body",
    "signed_other_path",
    "admin_token_instead",
]


@st.composite
def request_for(draw: st.DrawFn, env: Env, route: Route, auth: str | None = None) -> Request:
    method = (
        route.method
        if draw(st.integers(0, 19))
        else draw(
            st.sampled_from(
                ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "PROPFIND"]
            )
        )
    )
    req = Request(route, method, draw(path_qs(env, route)), draw(body_for(env, route)), "none")
    kind = auth or route.auth
    if kind in ("admin", "metrics"):
        how = draw(st.one_of(st.just("valid"), st.sampled_from(ADMIN_AUTH)))
        req.auth = "admin" if how in ("valid", "lowercase_scheme") else f"admin:{how}"
        header = _admin_header(env.api.token, how, draw(fz.header_text))
        if header is not None:
            req.headers.append(("Authorization", header))
    elif kind == "agent":
        req.signer = draw(st.sampled_from(env.agents))
        req.sig_damage = draw(st.one_of(st.just(""), st.sampled_from(SIG_DAMAGE)))
        req.auth = "agent" if not req.sig_damage else f"agent:{req.sig_damage}"
        if req.sig_damage == "admin_token_instead":
            req.auth = "admin"
    ctype = draw(st.sampled_from(fz.CONTENT_TYPES))
    if ctype is not None:
        req.headers.append(("Content-Type", ctype))
    for _ in range(draw(st.integers(0, 2))):
        name = draw(
            st.sampled_from(
                [
                    "X-Segd-Host",
                    "X-Segd-Timestamp",
                    "X-Segd-Nonce",
                    "X-Segd-Signature",
                    "X-Segd-Extra",
                    "Authorization",
                    "Accept",
                    "Content-Encoding",
                    "X-Forwarded-For",
                ]
            )
        )
        req.headers.append((name, draw(fz.header_text)))
    return req


def _admin_header(token: str, how: str, junk: str) -> str | None:
    return {
        "valid": f"Bearer {token}",
        "lowercase_scheme": f"bearer  {token} ",
        "missing": None,
        "scheme_only": "Bearer",
        "garbage": f"Bearer {junk}",
        "basic": f"Basic {token}",
        "token_only": token,
        "truncated": f"Bearer {token[:-1]}",
        "extended": f"Bearer {token}x",
    }[how]


def _signed_headers(env: Env, req: Request) -> list[tuple[str, str]]:
    agent = req.signer
    assert agent is not None
    damage = req.sig_damage
    now = env.clock()
    body, path = req.body, req.path_qs
    key, host = agent.key, agent.host_id
    if damage == "stale":
        now -= 3600
    elif damage == "future":
        now += 3600
    elif damage == "before_start":
        now = env.api.svc.started_at - 1
    elif damage == "signed_other_body":
        body = body + b" "
    elif damage == "signed_other_path":
        path = path + ("&" if "?" in path else "?") + "since=0"
    elif damage == "sig_other_key":
        key = env.b.key if agent is env.a else env.a.key
    elif damage == "other_host":
        host = env.b.host_id if agent is env.a else env.a.host_id
    elif damage == "unknown_host":
        host = "h_00000000000000ff"
    elif damage == "revoked_host":
        key, host = env.revoked.key, env.revoked.host_id
    h = crypto.sign_request(key, host, req.method, path, body, now)
    if damage == "nonce_replay":
        # A nonce the server accepted from this agent, freshly signed (the key holder
        # sending it again): refused while the server remembers it.
        h[crypto.HDR_NONCE] = env.captured[agent.host_id].nonce
        msg = crypto.request_string(req.method, path, h[crypto.HDR_TS], h[crypto.HDR_NONCE], body)
        h[crypto.HDR_SIG] = crypto.b64e(key.sign(msg).signature)
    drops = {
        "drop_host": crypto.HDR_AGENT,
        "drop_ts": crypto.HDR_TS,
        "drop_nonce": crypto.HDR_NONCE,
        "drop_sig": crypto.HDR_SIG,
    }
    if damage in drops:
        del h[drops[damage]]
    elif damage == "ts_garbage":
        h[crypto.HDR_TS] = "nan"
    elif damage == "nonce_garbage":
        h[crypto.HDR_NONCE] = "short"
    elif damage == "sig_flip":
        sig = bytearray(crypto.b64d(h[crypto.HDR_SIG]))
        sig[len(sig) // 2] ^= 0x10
        h[crypto.HDR_SIG] = crypto.b64e(bytes(sig))
    elif damage == "sig_truncate":
        h[crypto.HDR_SIG] = h[crypto.HDR_SIG][:-4]
    elif damage == "sig_padded":
        h[crypto.HDR_SIG] += "=="
    elif damage == "admin_token_instead":
        h = {"Authorization": f"Bearer {env.api.token}"}
    return list(h.items())


# ---- sending and checking ------------------------------------------------------------


NONCE_MEMORY_S = 100.0  # how long a captured nonce is surely remembered (the server: 2 x skew)


def _resolve_replays(env: Env, req: Request) -> None:
    """Turn a replay into the captured request it replays, or into a plain
    signed request when there is nothing (recent enough) to replay."""
    if req.signer is None or req.sig_damage not in ("replay", "nonce_replay"):
        return
    cap = env.captured.get(req.signer.host_id)
    if cap is None or env.clock() - cap.at > NONCE_MEMORY_S:
        req.sig_damage, req.auth = "", "agent"
    elif req.sig_damage == "replay":
        req.method, req.path_qs, req.body = cap.method, cap.path_qs, cap.body
        req.headers = list(cap.headers)
        req.route = matching_route(cap.method, cap.path_qs) or req.route
        req.signer = None


async def send(env: Env, req: Request) -> tuple[int, bytes]:
    _resolve_replays(env, req)
    headers: CIMultiDict[str] = CIMultiDict()
    signed: list[tuple[str, str]] = []
    if req.signer is not None:
        signed = _signed_headers(env, req)
        for k, v in signed:
            headers.add(k, v)
    for k, v in req.headers:
        headers.add(k, v)
    url = yarl.URL(req.path_qs, encoded=True)

    async def go() -> tuple[int, bytes]:
        async with env.api.client.request(
            req.method, url, data=req.body, headers=headers, skip_auto_headers=["Content-Type"]
        ) as r:
            if r.status == 200 and r.content_type == "text/event-stream":
                return r.status, b""  # a live stream never ends: its answering is enough
            return r.status, await r.read()

    status, raw = await asyncio.wait_for(go(), ANSWER_TIMEOUT_S)
    if req.signer is not None and req.auth == "agent" and status < 300:
        env.captured[req.signer.host_id] = Captured(
            env.clock(), req.method, req.path_qs, req.body, tuple(signed + req.headers)
        )
    return status, raw


async def state(api: Admin) -> dict[str, Any]:
    """What a user can see; without the refusal summaries the server writes in the
    background whenever a window of refusals ends."""
    snap = await api.snapshot()
    audit = await api.ok("GET", "/v1/audit?limit=1000")
    snap["audit"] = [e for e in audit if e["event"] != guard.SUMMARY_EVENT]
    return snap


def _error_code(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        return "?"


def check_error(status: int, raw: bytes) -> dict[str, str]:
    """A refusal: a 4xx whose body is exactly {"error": code, "message": one line}."""
    assert 400 <= status < 500, (status, raw[:500])
    answer = json.loads(raw)
    assert isinstance(answer, dict) and set(answer) == {"error", "message"}, answer
    code, message = answer["error"], answer["message"]
    assert isinstance(code, str) and _ERROR_CODE_RE.match(code), answer
    assert isinstance(message, str) and message.strip(), answer
    assert message.isprintable() and len(message.splitlines()) == 1, answer
    return answer


class RouteLike(Protocol):
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...


R = TypeVar("R", bound=RouteLike)


def route_matcher(routes: Iterable[R]) -> Callable[[str, str], R | None]:
    """`match(method, path_qs)`: the route of `routes` aiohttp gives the request
    to (it matches the decoded path), or None."""
    table = [
        (r, re.compile(_PARAM_RE.sub("[^/]+", r.path.replace(".", r"\.")) + r"\Z")) for r in routes
    ]

    def match(method: str, path_qs: str) -> R | None:
        path = yarl.URL(path_qs, encoded=True).path
        return next((r for r, rx in table if r.method == method and rx.match(path)), None)

    return match


matching_route = route_matcher(ROUTES)


def check_success(req: Request, status: int, raw: bytes) -> None:
    route = matching_route(req.method, req.path_qs)
    assert route is not None, f"{status} for a request no route takes"
    # metrics: the admin token, or no Authorization header at all from loopback
    # (the fuzzer's address), whatever else the request carries
    if route.auth == "metrics":
        ok = req.auth == "admin" or not any(n.lower() == "authorization" for n, _ in req.headers)
    else:
        ok = route.auth in ("none", req.auth)
    assert ok, f"{route.auth} route took {req.auth} credentials"
    if status == 204:
        assert route.response is None or route.path == "/v1/agent/instructions", status
        assert raw == b""
        return
    assert status == route.status, (status, route.status)
    if route.media == "application/json":  # else text, JSON lines or events
        msgspec.json.decode(raw, type=route.response)


def check_no_write(req: Request, before: dict[str, Any], after: dict[str, Any], code: str) -> None:
    new_audit = [
        e
        for e in after.pop("audit")
        if e["id"] > max((x["id"] for x in before["audit"]), default=0)
    ]
    before = {k: v for k, v in before.items() if k != "audit"}
    assert after == before, f"a refused request ({code}) changed the store"
    route = matching_route(req.method, req.path_qs)
    events, codes = AUDITED_REFUSALS.get(route.path if route else "", (frozenset(), frozenset()))
    if code in codes and not (route and route.path in SUMMED_UP and new_audit == []):
        [entry] = new_audit
        assert entry["event"] in events and entry["result"] == "denied", entry
        assert entry["reason"] == code, entry
    else:
        assert new_audit == [], f"a refused request ({code}) was audited: {new_audit}"


# What the documentation promises of stored values, written out again here (not
# taken from the code under test, whose own patterns may be the bug).
LABEL_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")
SERVICE = re.compile(r"icmp|(?:tcp|udp)/[1-9][0-9]{0,4}(?:-[1-9][0-9]{0,4})?")


def check_stored(env: Env, snap: dict[str, Any]) -> None:
    """Everything the store took has the shape validation promises: no value
    from the wire got in with a stray newline, NUL, space or shell syntax."""
    dims = set(env.api.svc.dims)

    def labels(ls: dict[str, str]) -> None:
        assert set(ls) <= dims, ls
        assert all(LABEL_VALUE.fullmatch(v) for v in ls.values()), ls

    def selectors(sel: Any) -> None:
        assert sel == "any" or (isinstance(sel, list) and sel), sel
        for ls in [] if sel == "any" else sel:
            labels(ls)

    for p in snap["profiles"]:
        assert NAME.fullmatch(p["name"]), p
        labels(p["labels"])
        assert set(p["locked"]) <= set(p["labels"]), p
    for r in snap["rules"]:
        selectors(r["providers"])
        selectors(r["consumers"])
        assert all(SERVICE.fullmatch(x) for x in r["services"]), r
        assert all(NAME.fullmatch(x) for x in r["options"]), r
    for w in snap["workloads"]:
        labels(w["labels"])
        assert CONTAINER_ID.fullmatch(w["container_id"]), w
        for ip in w["ips"]:
            assert str(ipaddress.ip_address(ip)) == ip and "%" not in ip, w
    for h in snap["hosts"]:
        assert HOSTNAME.fullmatch(h["hostname"]), h
    for k in snap["keys"]:
        assert k["uses"] >= 0 and (k["max_uses"] is None or k["uses"] <= k["max_uses"]), k


async def check_renders(env: Env) -> None:
    """Every live host's instructions render: nothing on the wire breaks a peer's ruleset."""
    for agent in env.agents:
        status, body = await agent.instructions()
        if status == 403:  # the fuzz revoked this host
            continue
        assert status == 200, (status, body)
        instr = agent.open(body)
        logged = render.log_rules(instr.rules)
        for wp in instr.workloads:
            assert_plan_grammar(render.render_workload(wp, instr.sets, logged))
            assert_plan_grammar(render.render_workload(wp, instr.sets, logged, was=instr.sets))
        delta = render.render_set_delta({}, instr.sets, instr.sets)
        if delta is not None:
            assert_plan_grammar(delta)


async def exchange(env: Env, req: Request) -> tuple[int, bytes]:
    """Send `req` and check every invariant; returns the answer."""
    before = await state(env.api)
    status, raw = await send(env, req)
    route = matching_route(req.method, req.path_qs)
    code = _error_code(raw) if status >= 400 else ""
    event(f"{req.method} {route.path if route else '?'} -> {status} {code}".rstrip())
    assert status < 500, (status, raw[:500])
    if req.method == "HEAD":  # no body by definition: only the status can be checked
        assert status >= 400 or matching_route("GET", req.path_qs) is not None, status
        assert await state(env.api) == before, "a HEAD changed the store"
    elif status >= 300:
        answer = check_error(status, raw)
        check_no_write(req, before, await state(env.api), answer["error"])
    else:
        check_success(req, status, raw)
        if route is not None and route.path == ROTATE_TOKEN:
            env.api.token = json.loads(raw)["token"]
        after = await state(env.api)
        if req.method == "GET":
            assert after == before, "a GET changed the store"
        else:
            check_stored(env, after)
            await refresh_ids(env)
            await check_renders(env)
    return status, raw


# ---- what segd may write into a ruleset ----------------------------------------------

_ID = r"[A-Za-z0-9_-]{1,64}"
_SET = r"(?:ls|ip)_[0-9a-f]{16}_v[46]"  # ip_: address blocks, in interval sets
_ADDR = r"(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9a-f:.]*:[0-9a-f:.]*)(?:/[0-9]{1,3})?"
_MATCH = r"(?:(?:tcp|udp) dport [0-9]{1,5}(?:-[0-9]{1,5})?|meta l4proto (?:icmp|ipv6-icmp))"
_TAIL = (
    rf'(?:log group 7 prefix "segd:(?:in|out):a:(?P<lid>{_ID})" )?'
    rf'accept comment "(?P<cid>{_ID})"'
)
_ELEMENTS = rf"\{{ {_ADDR}(?:, {_ADDR})* \}}"
_RULES = [
    r'(?:iif|oif) "lo" accept',
    r"ct state established,related accept",
    r"ct state invalid drop",
    r"icmpv6 type \{ nd-neighbor-solicit, nd-neighbor-advert, "
    r"nd-router-(?:advert|solicit) \} accept",
    rf"(?:(?:ip|ip6) (?:saddr|daddr) @{_SET} )?{_MATCH} {_TAIL}",
    r'limit rate 100/second burst 200 packets log group 7 prefix "segd:(?:in|out):[bp]"',
    r"accept",  # the tail of a chain in visibility mode
]
GRAMMAR = [
    re.compile(line + r"\Z")
    for line in (
        r"add table inet segd",
        r"delete table inet segd",
        r"flush table inet segd",
        r"table inet segd \{",
        r"\}",
        rf"\tset {_SET} \{{",
        r"\t\ttype ipv[46]_addr",
        r"\t\tflags interval",
        rf"\t\telements = {_ELEMENTS}",
        r"\t\}",
        r"\tchain (?:input|output) \{",
        r"\t\ttype filter hook (?:input|output) priority filter; policy drop;",
        *(rf"\t\t{rule}" for rule in _RULES),
        *(rf"add rule inet segd (?:input|output) {rule}" for rule in _RULES),
        rf"(?:add|delete) element inet segd {_SET} {_ELEMENTS}",
        rf"add set inet segd {_SET} \{{ type ipv[46]_addr;(?: flags interval;)? \}}",
        rf"(?:delete|flush) set inet segd {_SET}",
    )
]


def assert_plan_grammar(plan: Plan) -> None:
    """`assert_script_grammar` for every transaction of the plan and its fallback
    (the shadow table read as the table it shadows)."""
    for tx in plan.txs:
        assert_script_grammar(tx.replace("inet segd_shadow", "inet segd"))
    if plan.fallback is not None:
        assert_plan_grammar(plan.fallback)


def assert_script_grammar(script: str) -> None:
    """Every line is one segd emits, addresses are addresses, ports are ports."""
    assert script.endswith("\n"), script[-50:]
    for line in script[:-1].split("\n"):
        m = next((g.match(line) for g in GRAMMAR if g.match(line)), None)
        assert m is not None, f"line outside segd's grammar: {line!r}"
        if m.groupdict().get("lid") is not None:
            assert m["lid"] == m["cid"], line
        blocks = " ip_" in line or line.startswith("\t\telements")
        for addr in re.findall(r"(?<=[{,] )[^ ,}]+", line):
            if addr.startswith("nd-") or line.startswith("add set "):
                continue
            if "/" in addr:  # a block: only in a set of blocks, host bits zero
                assert blocks, line
                ipaddress.ip_network(addr, strict=True)
            else:
                ipaddress.ip_address(addr)
        for port in re.findall(r"dport ([0-9]+)(?:-([0-9]+))?", line):
            lo, hi = int(port[0]), int(port[1] or port[0])
            assert 1 <= lo <= hi <= 65535, line


def encode(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")


def can_be_invalid(route: Any) -> bool:
    """Whether a request to the route (of the server's or the orchestrator's
    table) can be schema-invalid at all: schemathesis then sends invalid ones too.
    A route whose credentials are optional (`metrics`: none from loopback) cannot
    be made invalid by leaving them out."""
    optional = route.auth in ("none", "metrics")
    return bool(route.body or route.query or "{" in route.path or not optional)


def run_examples(
    cases: Any, examples: int, derandomize: bool, check: Callable[[Any], None]
) -> None:
    """`check` each of about `examples` (scaled by SEGD_FUZZ_SCALE) cases drawn from
    `cases`, without a deadline, example database or health checks."""

    @settings(
        max_examples=max(1, int(examples * fz.SCALE)),
        deadline=None,
        database=None,
        derandomize=derandomize,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],
    )
    @given(case=cases)
    def run(case: Any) -> None:
        check(case)

    run()
