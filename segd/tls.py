"""TLS for segd's listeners: a server context from a `[*.tls]` config section."""

from __future__ import annotations

import ssl

from segd.config import TLSConfig


def listener_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """None for plain HTTP; with `client_ca`, client certificates are required."""
    if not tls.cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls.cert, tls.key)
    if tls.client_ca:
        ctx.load_verify_locations(tls.client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
