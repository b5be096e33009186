"""An OpenAPI 3.1 document generated from the route table and the msgspec types."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec

import segd
from segd import crypto, wire
from segd.server.api import Route

_PATH_PARAM = re.compile(r"\{([a-z_]+)\}")

_SECURITY = {
    "admin": {"type": "http", "scheme": "bearer", "description": "admin token (admin.token)"},
    "agent": {
        "type": "apiKey",
        "in": "header",
        "name": crypto.HDR_SIG,
        "description": (
            f"Ed25519 signature by the registered agent key over method, path with query, "
            f"timestamp, nonce and body SHA-256; with headers {crypto.HDR_AGENT}, "
            f"{crypto.HDR_TS} and {crypto.HDR_NONCE}"
        ),
    },
}


def build(routes: Iterable[Route]) -> dict[str, Any]:
    routes = list(routes)
    types: list[Any] = [wire.Error]
    for r in routes:
        if r.body is not None:
            types.append(r.body)
        if r.response is not None:
            types.append(r.response)
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    ref = dict(zip((id(t) for t in types), schemas, strict=True))
    error = {"content": {"application/json": {"schema": ref[id(wire.Error)]}}}
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {
            "summary": r.summary,
            "operationId": f"{r.method.lower()}_{r.handler.__name__}",
        }
        params = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in _PATH_PARAM.findall(r.path)
        ]
        params += [
            {"name": q.name, "in": "query", "required": False, "description": q.description,
             "schema": {"type": q.type}}
            for q in r.query
        ]  # fmt: skip
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref[id(r.body)]}},
            }
        responses: dict[str, Any] = {}
        if r.response is not None:
            responses[str(r.status)] = {
                "description": "OK",
                "content": {"application/json": {"schema": ref[id(r.response)]}},
            }
        if r.response is None or r.path == "/v1/agent/instructions":
            responses["204"] = {"description": "No content"}
        responses["4XX"] = {"description": "Bad input, unauthorised or not found", **error}
        responses["503"] = {"description": "Store unavailable", **error}
        op["responses"] = responses
        if r.auth != "none":
            op["security"] = [{r.auth: []}]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "segd server API", "version": segd.__version__},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": _SECURITY},
    }


def document(routes: Iterable[Route]) -> bytes:
    return msgspec.json.encode(build(routes), order="sorted")
