"""The pairing benchmark's baseline: an aiohttp handler that answers a fixed small JSON.

`python -m bench.fixed_server PORT` serves every method and path on
127.0.0.1:PORT: it reads the request body and returns `{"status":"ok"}`.
"""

from __future__ import annotations

import sys

from aiohttp import web

BODY = b'{"status":"ok"}'


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
