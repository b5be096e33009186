"""An application on segd's listener: `await start()`, then `await stop()`.

The listener (`segd.http.listener`) keeps the `[*.connections]` limits; TLS
when configured. `stop` stops accepting and drains in-flight requests for up
to `shutdown_timeout` seconds.
"""

from __future__ import annotations

import socket
import ssl

from aiohttp import web

from segd.config import ConnectionLimits, TLSConfig
from segd.errors import SegdError
from segd.http.listener import ListenerRunner, ListenerSite
from segd.tls import listener_context


class Runner:
    def __init__(
        self,
        app: web.Application,
        *,
        listen: str,
        limits: ConnectionLimits,
        tls: TLSConfig,
        sock: socket.socket | None = None,
        shutdown_timeout: float,
    ) -> None:
        self.app = app
        self._listen = listen
        self._tls = tls
        self._sock = sock
        self._runner = ListenerRunner(app, limits, shutdown_timeout=shutdown_timeout)
        self._started = False
        self.url = ""  # e.g. https://127.0.0.1:8443 once started
        self.tls = False

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Bound (host, port) pairs; useful with port 0."""
        return [
            (str(a[0]), int(a[1]))
            for a in self._runner.addresses
            if isinstance(a, tuple) and len(a) >= 2
        ]

    async def start(self) -> None:
        """Listen; SegdError when the TLS files or the address cannot be used."""
        try:
            ctx = listener_context(self._tls)
        except (OSError, ssl.SSLError) as e:
            raise SegdError(f"cannot load the listener's TLS files: {e}") from None
        await self._runner.setup()
        self._started = True
        site = ListenerSite(self._runner, self._listen, sock=self._sock, ssl_context=ctx)
        try:
            await site.start()
        except OSError as e:
            await self.stop()
            raise SegdError(f"cannot listen on {self._listen}: {e.strerror or e}") from None
        except BaseException:
            await self.stop()
            raise
        self.tls = ctx is not None
        if self.addresses:
            host, port = self.addresses[0]
            host = f"[{host}]" if ":" in host else host
            self.url = f"{'https' if self.tls else 'http'}://{host}:{port}"

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._runner.cleanup()
