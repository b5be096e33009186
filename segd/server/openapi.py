"""The server API's OpenAPI document: the kit's generator (`segd.http.openapi`)
with the server's security schemes, query bounds and what its validators add to
the wire types that the types themselves cannot state.

The server also refuses some documented-valid requests (an unknown label
dimension, locked dimensions missing from the labels, a name that exists).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from segd import crypto, policy
from segd.http import openapi as kit
from segd.http.openapi import Constraints, Operation, bounded, labels, named, pattern, text
from segd.server import validate

__all__ = ["Constraints", "bounded", "build", "document", "labels", "named", "pattern", "text"]

_SECURITY = {
    "admin": kit.ADMIN_SECURITY,
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


def selectors(dimensions: Sequence[str] | None = None) -> dict[str, Any]:
    return {
        "description": "label sets (empty only beside address blocks), or 'any'",
        "anyOf": [
            {
                "type": "array",
                "minItems": 0,
                "maxItems": validate.MAX_SELECTORS,
                "items": labels(dimensions),
            },
            {"enum": ["any"]},
        ],
    }


CONTAINER_ID = named(validate.CONTAINER_ID_RE)
# 32 bytes of base64url without padding: 43 characters, the last one with its
# two unused low bits clear (the decoder refuses non-canonical text).
PUBLIC_KEY = {"type": "string", "pattern": "^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]$"}
# A WireGuard key: 32 bytes of standard base64, padded, canonical (not all zero).
WG_PUBLIC_KEY = {"type": "string", "pattern": "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"}
ENDPOINT = {
    "type": "string",
    "maxLength": 64,
    "pattern": r"^(\[[0-9A-Fa-f:.]+\]|[0-9.]+):[0-9]{1,5}$",
    "description": "IP:PORT of the host's WireGuard interface, IPv6 as [IP]:PORT",
}
BLOCKS = {
    "type": "array",
    "items": {"type": "string", "pattern": "^[0-9A-Fa-f:.]+(/[0-9]{1,3})?$"},
}


def server_constraints(dimensions: Sequence[str] | None = None) -> Constraints:
    """What the server's validators add to its wire types."""
    dims = labels(dimensions)
    return {
        "RuleIn": {
            "providers": selectors(dimensions),
            "consumers": selectors(dimensions),
            "options": {"type": "array", "items": {"enum": sorted(policy.RULE_OPTIONS)}},
            "description": text(validate.MAX_DESCRIPTION),
            "provider_ips": BLOCKS,
            "consumer_ips": BLOCKS,
        },
        "MeshJoinIn": {"public_key": WG_PUBLIC_KEY, "endpoint": ENDPOINT},
        "ProfileIn": {
            "name": named(validate.NAME_RE),
            "labels": dims,
            "locked": {"type": "array", "items": {"type": "string", **dims["propertyNames"]}},
            "description": text(validate.MAX_DESCRIPTION),
        },
        "KeyIssueIn": {
            "profile": named(validate.NAME_RE),
            "description": text(validate.MAX_DESCRIPTION),
        },
        "RegisterIn": {"hostname": named(validate.HOSTNAME_RE), "public_key": PUBLIC_KEY},
        "PairIn": {
            "container_id": CONTAINER_ID,
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


def build(
    routes: Iterable[Operation],
    *,
    title: str = "segd server API",
    dimensions: Sequence[str] | None = None,
    constraints: Constraints | None = None,
) -> dict[str, Any]:
    return kit.build(
        routes,
        title=title,
        constraints=server_constraints(dimensions) if constraints is None else constraints,
        query=QUERY,
        errors=ERRORS,
        security=_SECURITY,
        no_content=("/v1/agent/instructions",),
    )


def document(routes: Iterable[Operation], **options: Any) -> bytes:
    return msgspec.json.encode(build(routes, **options), order="sorted")
