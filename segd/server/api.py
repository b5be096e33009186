"""The REST API: one route table drives the handlers, the auth and the OpenAPI doc.

Each route names who may call it (`none`, `admin` by bearer token, `agent` by
signed request), the msgspec type of its body and of its answer. The HTTP
kit's adapter (`segd.http.routes`) runs `authenticate`, reads the body
(size-limited), decodes strictly and encodes the answer; handlers are
one-liners into `Service.admin` and `Service.agents`. A request on a `none`
route, or with refused credentials, is charged to its source's rate limit
first (`guard`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

import segd
from segd import crypto, wire
from segd.errors import Forbidden, Unauthorized, Unavailable
from segd.http import routes
from segd.http.params import float_param, int_param
from segd.http.routes import Body, Param
from segd.ratelimit import source_of
from segd.server.auth import NonceCache, require_admin, verify_agent
from segd.server.refusals import clip
from segd.server.service import Service


class Runtime:
    """What the handlers need, filled on start-up (a running app's items are frozen)."""

    svc: Service | None = None
    nonces: NonceCache | None = None


RUNTIME = web.AppKey("segd_runtime", Runtime)
OPENAPI = web.AppKey("segd_openapi", bytes)

MAX_AUDIT = 1000


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who called, as the authenticate hook found: the service, the calling
    agent's host id ("" when not an agent route), the rate-limited source of
    the request (`ratelimit.source_of`; worked out only where charged)."""

    svc: Service
    host_id: str = ""
    source: str = ""


Call = routes.Call[Caller]
Route = routes.Route[Caller]


# ---- handlers -----------------------------------------------------------------------


async def health(c: Call) -> wire.Health:
    return wire.Health(status="ok", version=segd.__version__, key_id=c.ctx.svc.pub.key_id)


async def openapi(c: Call) -> web.Response:
    return web.Response(body=c.request.app[OPENAPI], content_type="application/json")


async def add_rule(c: Call) -> wire.Rule:
    return await c.ctx.svc.admin.add_rule(c.body_as(wire.RuleIn))


async def list_rules(c: Call) -> list[wire.Rule]:
    return await c.ctx.svc.store.rules()


async def delete_rule(c: Call) -> None:
    await c.ctx.svc.admin.delete_rule(c.arg("id"))


async def add_profile(c: Call) -> wire.Profile:
    return await c.ctx.svc.admin.add_profile(c.body_as(wire.ProfileIn))


async def list_profiles(c: Call) -> list[wire.Profile]:
    return await c.ctx.svc.store.profiles()


async def delete_profile(c: Call) -> None:
    await c.ctx.svc.admin.delete_profile(c.arg("name"))


async def revoke_profile(c: Call) -> list[wire.PairingKey]:
    return await c.ctx.svc.admin.revoke_profile(
        c.arg("name"), unpair=c.body_as(wire.RevokeIn).unpair
    )


async def issue_key(c: Call) -> wire.KeyIssued:
    return await c.ctx.svc.admin.issue_key(c.body_as(wire.KeyIssueIn))


async def list_keys(c: Call) -> list[wire.PairingKey]:
    return await c.ctx.svc.admin.list_keys(c.request.query.get("profile"))


async def revoke_key(c: Call) -> wire.PairingKey:
    return await c.ctx.svc.admin.revoke_key(c.arg("key_id"), unpair=c.body_as(wire.RevokeIn).unpair)


async def list_workloads(c: Call) -> list[wire.Workload]:
    return await c.ctx.svc.store.workloads(c.request.query.get("host"))


async def unpair_workload(c: Call) -> None:
    await c.ctx.svc.admin.unpair_workload(c.arg("id"))


async def list_hosts(c: Call) -> list[wire.Host]:
    return await c.ctx.svc.admin.list_hosts()


async def revoke_host(c: Call) -> wire.Host:
    return await c.ctx.svc.admin.revoke_host(c.arg("id"))


async def list_audit(c: Call) -> list[wire.AuditEntry]:
    limit = int_param(c.request, "limit", 100, 1, MAX_AUDIT)
    after = int_param(c.request, "after", 0, 0, 2**62) if "after" in c.request.query else None
    return await c.ctx.svc.store.audit(limit, after)


async def new_activation_code(c: Call) -> wire.ActivationCode:
    return await c.ctx.svc.admin.new_activation_code(c.body_as(wire.ActivationCodeIn))


async def rotate_admin_token(c: Call) -> wire.AdminToken:
    return await c.ctx.svc.admin.rotate_admin_token()


async def register(c: Call) -> wire.Registered:
    return await c.ctx.svc.agents.register(c.body_as(wire.RegisterIn), c.ctx.source)


async def pair(c: Call) -> wire.PairResult:
    return await c.ctx.svc.agents.pair(c.ctx.host_id, c.body_as(wire.PairIn))


async def unpair(c: Call) -> None:
    await c.ctx.svc.agents.unpair(c.ctx.host_id, c.body_as(wire.UnpairIn))


async def instructions(c: Call) -> web.Response | None:
    since = int_param(c.request, "since", 0, 0, 2**62)
    wait = float_param(c.request, "wait", 0.0, 0.0, c.ctx.svc.cfg.longpoll_timeout_s)
    body = await c.ctx.svc.agents.instructions(c.ctx.host_id, since, wait)
    return None if body is None else web.Response(body=body, content_type="application/json")


async def join_mesh(c: Call) -> wire.MeshJoined:
    return await c.ctx.svc.agents.join_mesh(c.ctx.host_id, c.body_as(wire.MeshJoinIn))


async def report(c: Call) -> None:
    await c.ctx.svc.agents.report(c.ctx.host_id, c.body_as(wire.AgentReport))


async def sidecars(c: Call) -> None:
    await c.ctx.svc.agents.sidecars(c.ctx.host_id, c.body_as(wire.SidecarsIn))


_LIMIT = Param("limit", "integer", f"how many entries (1-{MAX_AUDIT}, default 100)")
_AFTER = Param("after", "integer", "only entries with a larger id, oldest first")

# fmt: off
ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/health", health, "Liveness and the server key id", "none",
          response=wire.Health),
    Route("GET", "/v1/openapi.json", openapi, "This document", "none", response=dict[str, Any]),
    Route("POST", "/v1/rules", add_rule, "Add a rule", body=wire.RuleIn, response=wire.Rule,
          status=201),
    Route("GET", "/v1/rules", list_rules, "List rules", response=list[wire.Rule]),
    Route("DELETE", "/v1/rules/{id}", delete_rule, "Remove a rule"),
    Route("POST", "/v1/profiles", add_profile, "Add a pairing profile", body=wire.ProfileIn,
          response=wire.Profile, status=201),
    Route("GET", "/v1/profiles", list_profiles, "List pairing profiles",
          response=list[wire.Profile]),
    Route("DELETE", "/v1/profiles/{name}", delete_profile,
          "Remove a pairing profile and its keys (they stop working)"),
    Route("POST", "/v1/profiles/{name}/revoke", revoke_profile,
          "Revoke every key of a profile (with unpair, also unpair what they paired)",
          body=wire.RevokeIn, response=list[wire.PairingKey]),
    Route("POST", "/v1/keys", issue_key, "Issue a pairing key", body=wire.KeyIssueIn,
          response=wire.KeyIssued, status=201),
    Route("GET", "/v1/keys", list_keys, "List pairing keys", response=list[wire.PairingKey],
          query=(Param("profile", "string", "only the keys of this profile"),)),
    Route("POST", "/v1/keys/{key_id}/revoke", revoke_key,
          "Revoke a pairing key (with unpair, also unpair what it paired)",
          body=wire.RevokeIn, response=wire.PairingKey),
    Route("GET", "/v1/workloads", list_workloads,
          "List paired workloads, each with the containers sharing its network namespace",
          response=list[wire.Workload],
          query=(Param("host", "string", "only the workloads of this host"),)),
    Route("DELETE", "/v1/workloads/{id}", unpair_workload,
          "Unpair a workload on every host; its container does not pair again"),
    Route("GET", "/v1/hosts", list_hosts, "List agent hosts", response=list[wire.Host]),
    Route("POST", "/v1/hosts/{id}/revoke", revoke_host,
          "Revoke a host: refuse its agent and drop its workloads", response=wire.Host),
    Route("GET", "/v1/audit", list_audit, "Audit log (the latest entries, or after an id)",
          response=list[wire.AuditEntry], query=(_LIMIT, _AFTER)),
    Route("POST", "/v1/activation-codes", new_activation_code,
          "Issue a single-use agent activation code", body=wire.ActivationCodeIn,
          response=wire.ActivationCode, status=201),
    Route("POST", "/v1/admin-token/rotate", rotate_admin_token,
          "Replace the admin token: the answer and the server's admin.token hold the new one, "
          "every other token is refused from now on", response=wire.AdminToken),
    Route("POST", "/v1/agent/register", register, "Register an agent with an activation code",
          "none", body=wire.RegisterIn, response=wire.Registered, status=201),
    Route("POST", "/v1/agent/pair", pair, "Pair a container (idempotent per container)",
          "agent", body=wire.PairIn, response=wire.PairResult),
    Route("POST", "/v1/agent/unpair", unpair, "Unpair a container (idempotent)", "agent",
          body=wire.UnpairIn),
    Route("GET", "/v1/agent/instructions", instructions,
          "Long-poll the host's signed instructions; 204 when nothing newer in time",
          "agent", response=wire.SignedInstructions,
          query=(Param("since", "integer", "the version the agent holds (default 0)"),
                 Param("wait", "number", "seconds to wait for a newer version (capped)"))),
    Route("PUT", "/v1/agent/mesh", join_mesh,
          "Join the segd mesh: the host's subnet of the pool (kept across joins), and its "
          "WireGuard public key and endpoint for the hosts it exchanges traffic with",
          "agent", body=wire.MeshJoinIn, response=wire.MeshJoined),
    Route("POST", "/v1/agent/report", report, "Report an event to audit (e.g. tampering)",
          "agent", body=wire.AgentReport),
    Route("PUT", "/v1/agent/sidecars", sidecars,
          "Replace the host's list of containers in another container's network namespace",
          "agent", body=wire.SidecarsIn),
)
# fmt: on


# ---- wiring -------------------------------------------------------------------------


async def authenticate(request: web.Request, route: Route, body: Body) -> Caller:
    """Charge a `none` route to its source; check an admin token before the body
    is read, an agent's signature over it; refused credentials are charged too."""
    rt = request.app[RUNTIME]
    if rt.svc is None or rt.nonces is None:
        raise Unavailable("server is starting or stopping")
    svc = rt.svc
    what = f"{route.method} {route.path}"  # a refusal's sample
    if route.auth == "none":
        source = source_of(request.remote)
        svc.guard.admit(source, what, svc.clock())
        return Caller(svc, source=source)
    if route.auth == "admin":
        try:
            require_admin(svc, request)
        except Unauthorized as e:
            sample = f"{what} (admin token)"
            raise svc.guard.refused(source_of(request.remote), e, sample, svc.clock()) from None
        return Caller(svc)
    raw = await body.raw()
    try:
        host_id = await verify_agent(svc, rt.nonces, request, raw)
    except (Unauthorized, Forbidden) as e:
        sample = f"{what} as host {clip(request.headers.get(crypto.HDR_AGENT, ''))}"
        raise svc.guard.refused(source_of(request.remote), e, sample, svc.clock()) from None
    await svc.agents.touch(host_id)
    return Caller(svc, host_id=host_id)


def add_routes(app: web.Application) -> None:
    app.router.add_routes(routes.route_defs(ROUTES, authenticate))
