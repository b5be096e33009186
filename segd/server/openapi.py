"""An OpenAPI 3.1 document generated from a route table and the msgspec types.

The msgspec types give the shapes; `server_constraints` adds what the validators
refuse beyond them (name patterns, bounds, sizes), so a client generated from
the document sends what the server takes. A constraint here may only restate a
check the server makes: anything the document calls invalid must be refused.
The server also refuses some documented-valid requests (an unknown label
dimension, locked dimensions missing from the labels, a name that exists).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import msgspec

import segd
from segd import crypto, policy, wire
from segd.server import validate

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


class QueryParam(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def description(self) -> str: ...


class Operation(Protocol):
    """What the document needs of a route (the server's `api.Route` is one)."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def handler(self) -> Callable[..., Any]: ...
    @property
    def summary(self) -> str: ...
    @property
    def auth(self) -> str: ...
    @property
    def body(self) -> type | None: ...
    @property
    def response(self) -> Any: ...
    @property
    def status(self) -> int: ...
    @property
    def query(self) -> Sequence[QueryParam]: ...


# component name -> property -> the schema that replaces msgspec's (its default kept)
Constraints = Mapping[str, Mapping[str, dict[str, Any]]]


def pattern(rx: re.Pattern[str]) -> str:
    """A Python pattern as an ECMA-262 one (JSON Schema): `\\Z` becomes `$`."""
    return rx.pattern.replace("\\Z", "$")


def text(max_length: int, *, newline: bool = False) -> dict[str, Any]:
    """A string without control characters (but `\\n` when `newline`)."""
    chars = "\\u0000-\\u0009\\u000b-\\u001f" if newline else "\\u0000-\\u001f"
    return {"type": "string", "maxLength": max_length, "pattern": f"^[^{chars}]*$"}


def named(rx: re.Pattern[str]) -> dict[str, Any]:
    return {"type": "string", "pattern": pattern(rx)}


def bounded(low: int, high: int, *, nullable: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer", "minimum": low, "maximum": high}
    return {"anyOf": [schema, {"type": "null"}]} if nullable else schema


def labels(dimensions: Sequence[str] | None = None) -> dict[str, Any]:
    """A label set; with `dimensions`, only those (the server's configuration)."""
    names = {"enum": list(dimensions)} if dimensions else {"pattern": pattern(policy.DIMENSION_RE)}
    return {
        "type": "object",
        "maxProperties": len(dimensions) if dimensions else policy.MAX_DIMENSIONS,
        "propertyNames": names,
        "additionalProperties": named(policy.VALUE_RE),
    }


def selectors(dimensions: Sequence[str] | None = None) -> dict[str, Any]:
    return {
        "anyOf": [
            {
                "type": "array",
                "minItems": 1,
                "maxItems": validate.MAX_SELECTORS,
                "items": labels(dimensions),
            },
            {"enum": ["any"]},
        ]
    }


CONTAINER_ID = named(validate.CONTAINER_ID_RE)
# 32 bytes of base64url without padding: 43 characters, the last one with its
# two unused low bits clear (the decoder refuses non-canonical text).
PUBLIC_KEY = {"type": "string", "pattern": "^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]$"}


def server_constraints(dimensions: Sequence[str] | None = None) -> Constraints:
    """What the server's validators add to its wire types."""
    dims = labels(dimensions)
    return {
        "RuleIn": {
            "providers": selectors(dimensions),
            "consumers": selectors(dimensions),
            "services": {
                "type": "array",
                "minItems": 1,
                "maxItems": validate.MAX_SERVICES,
                "items": {"type": "string"},
            },
            "options": {"type": "array", "items": {"enum": sorted(policy.RULE_OPTIONS)}},
            "description": text(validate.MAX_DESCRIPTION),
        },
        "ProfileIn": {
            "name": named(validate.NAME_RE),
            "labels": dims,
            "locked": {"type": "array", "items": {"type": "string", **dims["propertyNames"]}},
            "max_uses": {
                **bounded(1, validate.MAX_USES, nullable=True),
                "description": "new containers each key admits; null: unlimited",
            },
            "lifespan_s": bounded(1, validate.MAX_LIFESPAN_S),
            "description": text(validate.MAX_DESCRIPTION),
        },
        "KeyIssueIn": {
            "profile": named(validate.NAME_RE),
            "max_uses": {
                **bounded(1, validate.MAX_USES, nullable=True),
                "description": "absent: the profile's; null: unlimited",
            },
            "lifespan_s": bounded(1, validate.MAX_LIFESPAN_S, nullable=True),
            "description": text(validate.MAX_DESCRIPTION),
        },
        "ActivationCodeIn": {"lifespan_s": bounded(1, validate.MAX_CODE_LIFESPAN_S)},
        "RegisterIn": {"hostname": named(validate.HOSTNAME_RE), "public_key": PUBLIC_KEY},
        "PairIn": {
            "container_id": CONTAINER_ID,
            "pairing_key": {"type": "string", "maxLength": validate.MAX_PAIRING_KEY},
            "ips": {"type": "array", "maxItems": validate.MAX_IPS, "items": {"type": "string"}},
            "name": text(validate.MAX_WORKLOAD_NAME),
            "requested_labels": dims,
        },
        "UnpairIn": {"container_id": CONTAINER_ID},
        "AgentReport": {
            "event": named(validate.EVENT_RE),
            "container_id": {
                "type": "string",
                "pattern": f"^$|{pattern(validate.CONTAINER_ID_RE)}",
            },
            "detail": text(validate.MAX_DETAIL, newline=True),
        },
    }


# query parameter name -> its schema, where the handler bounds it
QUERY: Mapping[str, dict[str, Any]] = {
    "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
    "after": {"type": "integer", "minimum": 0, "maximum": 2**62},
    "since": {"type": "integer", "minimum": 0, "maximum": 2**62},
    "wait": {"type": "number", "minimum": 0},
}

# responses every operation may give besides its own
ERRORS: Mapping[str, str] = {
    "4XX": (
        "Bad input, unauthorised or not found; 429 (with Retry-After, in seconds) when "
        "one address sends too many requests without credentials or with refused ones"
    ),
    "503": "Store unavailable, or the listener holds too many connections (busy)",
}


def _constrain(components: dict[str, Any], constraints: Constraints) -> None:
    for name, props in constraints.items():
        properties = components[name]["properties"]
        for prop, schema in props.items():
            default = properties[prop].get("default", msgspec.UNSET)
            properties[prop] = dict(schema)
            if default is not msgspec.UNSET:
                properties[prop]["default"] = default


def _has_required_fields(body: type) -> bool:
    """An empty body stands for `{}`: one is needed only when a field has no default."""
    try:
        return any(f.required for f in msgspec.structs.fields(body))
    except TypeError:  # not a Struct
        return True


def build(
    routes: Iterable[Operation],
    *,
    title: str = "segd server API",
    dimensions: Sequence[str] | None = None,
    constraints: Constraints | None = None,
    query: Mapping[str, dict[str, Any]] = QUERY,
    errors: Mapping[str, str] = ERRORS,
) -> dict[str, Any]:
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
    _constrain(components, server_constraints(dimensions) if constraints is None else constraints)
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
             "schema": query.get(q.name, {"type": q.type})}
            for q in r.query
        ]  # fmt: skip
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {
                "required": _has_required_fields(r.body),
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
        for status, description in errors.items():
            responses[status] = {"description": description, **error}
        op["responses"] = responses
        if r.auth != "none":
            op["security"] = [{r.auth: []}]
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": segd.__version__},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": _SECURITY},
    }


def document(routes: Iterable[Operation], **options: Any) -> bytes:
    return msgspec.json.encode(build(routes, **options), order="sorted")
