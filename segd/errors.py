"""Errors that carry a stable code and a human message across every boundary."""

from __future__ import annotations


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
