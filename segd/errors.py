"""Errors that carry a stable code and a human message across every boundary."""

from __future__ import annotations

import math


class SegdError(Exception):
    """An error with a machine code (snake_case) and a one-line message."""

    code = "error"
    status = 400

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class InvalidInput(SegdError):
    code = "invalid_input"
    status = 400


class NotFound(SegdError):
    code = "not_found"
    status = 404


class Conflict(SegdError):
    code = "conflict"
    status = 409


class Unauthorized(SegdError):
    code = "unauthorized"
    status = 401


class Forbidden(SegdError):
    code = "forbidden"
    status = 403


class Unavailable(SegdError):
    code = "unavailable"
    status = 503


class RateLimited(SegdError):
    """Too many requests from one source: answered 429 with `Retry-After`."""

    code = "rate_limited"
    status = 429

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(f"too many requests from this address; retry in {self.retry_after} s")
