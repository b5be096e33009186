"""Query parameters: an unknown one is refused, known ones are parsed and bounded."""

from __future__ import annotations

import math
from collections.abc import Iterable

from aiohttp import web

from segd.errors import InvalidInput


def no_unknown(request: web.Request, allowed: Iterable[str]) -> None:
    """InvalidInput for a parameter not in `allowed` (a typo must not silently
    mean the default) or given more than once (which one counts is not said)."""
    unknown = sorted(set(request.query) - set(allowed))
    if unknown:
        raise InvalidInput(f"unknown query parameter {unknown[0]!r}")
    if len(request.query) != len(set(request.query)):
        repeated = sorted(k for k in set(request.query) if len(request.query.getall(k)) > 1)
        raise InvalidInput(f"query parameter {repeated[0]!r} given more than once")


def int_param(request: web.Request, name: str, default: int | None, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise InvalidInput(f"query parameter {name!r} is required")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {name!r} must be an integer") from None
    if not low <= value <= high:
        raise InvalidInput(f"query parameter {name!r} must be between {low} and {high}")
    return value


def float_param(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    """A number, clamped to `high` (so an agent may ask for longer than the server allows)."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {name!r} must be a number") from None
    if math.isnan(value) or value < low:
        raise InvalidInput(f"query parameter {name!r} must be at least {low}")
    return min(value, high)
