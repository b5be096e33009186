"""An OpenAPI 3.1 document of a route table, from its msgspec types.

msgspec gives the shapes and every constraint the types state with
`Annotated[..., msgspec.Meta(...)]` (patterns, lengths, bounds); an API's
`constraints` add what the types cannot say (a pattern a validator checks on a
free-text field, an enumeration from configuration). A constraint may only
restate a check the API makes: anything the document calls invalid is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import msgspec

import segd
from segd import policy, wire

_PATH_PARAM = re.compile(r"\{([a-z_]+)\}")

ADMIN_SECURITY = {"type": "http", "scheme": "bearer", "description": "admin token (admin.token)"}

# responses every operation may give besides its own
ERRORS: Mapping[str, str] = {
    "4XX": "Bad input, unauthorised or not found",
    "503": "Unavailable, or the listener holds too many connections (busy)",
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


def _constrain(components: dict[str, Any], constraints: Constraints) -> None:
    """Add each constraint to the schema msgspec derived for the property (a key
    the constraint names replaces msgspec's)."""
    for name, props in constraints.items():
        properties = components[name]["properties"]
        for prop, schema in props.items():
            properties[prop] = {**properties[prop], **schema}


def _has_required_fields(body: type) -> bool:
    """An empty body stands for `{}`: one is needed only when a field has no default."""
    try:
        return any(f.required for f in msgspec.structs.fields(body))
    except TypeError:  # not a Struct
        return True


def build(
    routes: Iterable[Operation],
    *,
    title: str,
    constraints: Constraints | None = None,
    query: Mapping[str, dict[str, Any]] | None = None,
    errors: Mapping[str, str] = ERRORS,
    security: Mapping[str, dict[str, Any]] | None = None,
    no_content: Iterable[str] = (),
) -> dict[str, Any]:
    """The document of `routes`; `query` gives the schema of a query parameter
    the handler bounds, `no_content` the paths that may also answer 204."""
    query = query or {}
    no_content = frozenset(no_content)
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
    _constrain(components, constraints or {})
    ref = dict(zip((id(t) for t in types), schemas, strict=True))
    error = {"content": {"application/json": {"schema": ref[id(wire.Error)]}}}
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op = _operation(r, ref, error, query, errors, r.path in no_content)
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": segd.__version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": dict(security or {"admin": ADMIN_SECURITY}),
        },
    }


def _operation(
    r: Operation,
    ref: Mapping[int, Any],
    error: dict[str, Any],
    query: Mapping[str, dict[str, Any]],
    errors: Mapping[str, str],
    may_be_empty: bool,
) -> dict[str, Any]:
    """One route's operation object."""
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
            "content": {getattr(r, "media", "application/json"): {"schema": ref[id(r.response)]}},
        }
    if r.response is None or may_be_empty:
        responses["204"] = {"description": "No content"}
    for status, description in errors.items():
        responses[status] = {"description": description, **error}
    op["responses"] = responses
    if r.auth != "none":
        op["security"] = [{r.auth: []}]
    return op


def document(routes: Iterable[Operation], **options: Any) -> bytes:
    """`build` encoded, keys sorted."""
    return msgspec.json.encode(build(routes, **options), order="sorted")
