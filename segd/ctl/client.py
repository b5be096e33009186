"""A small synchronous client for the server's admin API (urllib, no extra deps).

Where the server and the admin token come from, in order: `--server URL` /
`--token-file F`, then the environment (`SEGD_SERVER`, `SEGD_TOKEN`), then the
local all-in-one data dir (`SEGD_DATA_DIR`, default /var/lib/segd/allinone).
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from segd.config import (
    ADMIN_TOKEN_FILE,
    ALLINONE_SERVER_SUBDIR,
    DATA_DIR_ENV,
    DEFAULT_ALLINONE_DIR,
    DEFAULT_SERVER_LISTEN,
)

ENV_SERVER = "SEGD_SERVER"
ENV_TOKEN = "SEGD_TOKEN"
ENV_CA = "SEGD_CA"
DEFAULT_TIMEOUT_S = 30.0


class CtlError(Exception):
    """A failure to report as one line; `status` is the exit code."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


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


class ApiClient:
    def __init__(
        self,
        server: str,
        token: str,
        *,
        ca_file: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        token_file: Path | None = None,
    ) -> None:
        self.server = server
        self.token_file = token_file  # where the token came from (None: the environment)
        self._token = token
        self._timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        if server.startswith("https://"):
            try:
                self._ssl = ssl.create_default_context(cafile=ca_file or None)
            except (OSError, ssl.SSLError) as e:
                raise CtlError(f"cannot load CA file {ca_file}: {e}") from None

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str | int] | None = None,
    ) -> bytes:
        """Send one request; the raw JSON answer ("" for 204). Errors become CtlError."""
        url = self.server + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self._token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._ssl) as resp:
                out: bytes = resp.read()
                return out
        except urllib.error.HTTPError as e:
            raise CtlError(_error_message(e)) from None
        except urllib.error.URLError as e:
            reason = getattr(e.reason, "strerror", None) or str(e.reason)
            raise CtlError(f"cannot reach segd server at {self.server}: {reason}") from None
        except (TimeoutError, OSError) as e:
            raise CtlError(f"segd server at {self.server}: {e}") from None


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read()
        doc = json.loads(raw)
        message = str(doc["message"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"server answered HTTP {e.code} {e.reason}"
    return message.replace("\n", " ")
