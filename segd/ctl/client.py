"""Where `segd ctl` finds the server and its admin token; the client itself is
`segd.http.client.Client`.

Where the server and the admin token come from, in order: `--server URL` /
`--token-file F`, then the environment (`SEGD_SERVER`, `SEGD_TOKEN`), then the
local all-in-one data dir (`SEGD_DATA_DIR`, default /var/lib/segd/allinone).
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from segd.config import (
    ADMIN_TOKEN_FILE,
    ALLINONE_SERVER_SUBDIR,
    DATA_DIR_ENV,
    DEFAULT_ALLINONE_DIR,
    DEFAULT_SERVER_LISTEN,
)
from segd.http.client import DEFAULT_TIMEOUT_S, SERVER, Client, ClientError

ENV_SERVER = "SEGD_SERVER"
ENV_TOKEN = "SEGD_TOKEN"  # noqa: S105 - a variable name
ENV_CA = "SEGD_CA"


CtlError = ClientError  # a failure to report as one line; `status` is the exit code


def local_token_file() -> Path:
    root = os.environ.get(DATA_DIR_ENV) or DEFAULT_ALLINONE_DIR
    return Path(root) / ALLINONE_SERVER_SUBDIR / ADMIN_TOKEN_FILE


def resolve_server(flag: str | None) -> str:
    url = flag or os.environ.get(ENV_SERVER) or f"http://{DEFAULT_SERVER_LISTEN}"
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise CtlError(f"invalid server URL {url!r}: expected http://HOST:PORT or https://...", 2)
    return url.rstrip("/")


def read_token_file(path: str) -> str:
    return _read_token(Path(path), "--token-file")


def resolve_token(flag: str | None) -> str:
    return resolve_token_source(flag)[0]


def resolve_token_source(flag: str | None) -> tuple[str, Path | None]:
    """The admin token and the file it was read from (None: from the environment)."""
    if flag:
        return read_token_file(flag), Path(flag)
    env = os.environ.get(ENV_TOKEN, "").strip()
    if env:
        return env, None
    path = local_token_file()
    return _read_token(path, f"no --token-file or {ENV_TOKEN}; tried"), path


def _read_token(path: Path, what: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise CtlError(f"{what} {path}: cannot read admin token ({e.strerror})") from None
    if not token:
        raise CtlError(f"{what} {path}: file is empty")
    return token


class ApiClient(Client):
    """The server's admin API (`segd.http.client.Client`), and where its token came from."""

    def __init__(
        self,
        server: str,
        token: str,
        *,
        ca_file: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        token_file: Path | None = None,
    ) -> None:
        super().__init__(server, token, peer=SERVER, ca_file=ca_file, timeout=timeout)
        self.token_file = token_file  # where the token came from (None: the environment)
