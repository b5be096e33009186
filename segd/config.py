"""TOML configuration for every mode, decoded into strict msgspec Structs.

One file holds the sections a mode needs (`[server]`, `[agent]`,
`[orchestrator]`, `[log]`). Unknown keys, wrong types and bad values are refused
with the file, the key and the reason before anything starts.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import msgspec

from segd import contract
from segd.errors import InvalidInput
from segd.policy import DEFAULT_DIMENSIONS, validate_dimensions

DEFAULT_SERVER_LISTEN = "127.0.0.1:7400"
DEFAULT_ORCH_LISTEN = "127.0.0.1:7401"
DEFAULT_ALLINONE_DIR = "/var/lib/segd/allinone"
DATA_DIR_ENV = "SEGD_DATA_DIR"  # overrides DEFAULT_ALLINONE_DIR for allinone and `segd ctl`
ALLINONE_SERVER_SUBDIR = "server"  # the server's data dir inside the allinone data dir
ADMIN_TOKEN_FILE = "admin.token"  # in the server's data dir, 0600  # noqa: S105 - a file name
MAX_FUTURE_SKEW_S = 30.0
# Requests without credentials (and failed credentials) per source address.
DEFAULT_RATE_LIMIT_PER_S = 10.0
DEFAULT_RATE_LIMIT_BURST = 100

# What the server takes as an agent's hostname (segd.server.validate.HOSTNAME_RE).
_LISTEN_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})\Z")


class ConfigError(Exception):
    """A configuration problem: names the file, the key and the reason."""

    def __init__(self, path: str, key: str, reason: str):
        self.path, self.key, self.reason = path, key, reason
        where = f"{_printable(path)}: " if path else ""
        keypart = f"key '{_printable(key)}': " if key else ""
        super().__init__(f"config error: {where}{keypart}{_printable(reason)}")


def _printable(text: str) -> str:
    """One line: a quoted TOML key or a file name may hold a newline or worse."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 in brackets) -> (host, port); ValueError when malformed."""
    m = _LISTEN_RE.match(text)
    if not m or not (0 < int(m.group(2)) < 65536):
        raise ValueError(f"invalid listen address {text!r}: expected HOST:PORT")
    return m.group(1).strip("[]"), int(m.group(2))


def _loopback_listen(text: str) -> tuple[str, int]:
    """A `HOST:PORT` whose host is a loopback address (the agent's metrics)."""
    host, port = parse_listen(text)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{text!r}: must be a loopback address (127.0.0.1:PORT or [::1]:PORT)")
    return host, port


def _check(key: str, fn: Callable[[str], object], value: str) -> None:
    try:
        fn(value)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def _check_path(key: str, value: str, *, required: bool = False) -> None:
    """A file or directory name: no NUL byte (the OS refuses it), not empty when required."""
    if required and not value:
        raise ValueError(f"{key}: must not be empty")
    if "\x00" in value:
        raise ValueError(f"{key}: a path cannot contain a NUL character")


def _check_rate_limit(per_s: float, burst: int) -> None:
    if not 0.01 <= per_s <= 1_000_000:
        raise ValueError("rate_limit_per_s: must be between 0.01 and 1000000")
    if not 1 <= burst <= 1_000_000:
        raise ValueError("rate_limit_burst: must be between 1 and 1000000")


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class LogConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json"] = "auto"


class TLSConfig(_Strict):
    cert: str = ""
    key: str = ""
    client_ca: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert: tls needs both cert and key")
        for key in ("cert", "key", "client_ca"):
            _check_path(key, getattr(self, key))


class ConnectionLimits(_Strict):
    """How long and how many connections a listener keeps (segd.http.listener)."""

    max_open: int = 4096
    idle_timeout_s: float = 60.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 16 <= self.max_open <= 1_000_000:
            raise ValueError("max_open: must be between 16 and 1000000")
        if not 1 <= self.idle_timeout_s <= 3600:
            raise ValueError("idle_timeout_s: must be between 1 and 3600")
        if not 0.5 <= self.header_timeout_s <= 300:
            raise ValueError("header_timeout_s: must be between 0.5 and 300")
        if not 0.5 <= self.body_timeout_s <= 3600:
            raise ValueError("body_timeout_s: must be between 0.5 and 3600")


class FlowsConfig(_Strict):
    """The server's flow store (`segd.server.flowstore`)."""

    retention_days: int = 7  # flows older than this are deleted; 0 keeps every flow
    rollup_after_hours: int = 24  # older flows are summed per hour; 0: never
    max_stream_clients: int = 64  # `GET /v1/flows/stream` connections at once
    max_records_per_s: int = 5000  # flow records taken in a second; 0: no limit

    def __post_init__(self) -> None:
        if not 0 <= self.retention_days <= 3650:
            raise ValueError("retention_days: must be between 0 (keep all) and 3650")
        if not 0 <= self.rollup_after_hours <= 24 * 3650:
            raise ValueError("rollup_after_hours: must be between 0 (never) and 87600")
        if not 1 <= self.max_stream_clients <= 10_000:
            raise ValueError("max_stream_clients: must be between 1 and 10000")
        if not 0 <= self.max_records_per_s <= 10_000_000:
            raise ValueError("max_records_per_s: must be between 0 (no limit) and 10000000")


class ServerConfig(_Strict):
    listen: str = DEFAULT_SERVER_LISTEN
    data_dir: str = "/var/lib/segd/server"
    dimensions: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_DIMENSIONS))
    max_body_bytes: int = 65536
    request_skew_s: float = 60.0  # how old an agent's request may be
    request_future_skew_s: float = 5.0  # how far ahead of the server clock
    longpoll_timeout_s: float = 30.0
    rate_limit_per_s: float = DEFAULT_RATE_LIMIT_PER_S
    rate_limit_burst: int = DEFAULT_RATE_LIMIT_BURST
    audit_retention_days: int = 90  # 0: keep every entry
    tls: TLSConfig = msgspec.field(default_factory=TLSConfig)
    connections: ConnectionLimits = msgspec.field(default_factory=ConnectionLimits)
    flows: FlowsConfig = msgspec.field(default_factory=FlowsConfig)

    def __post_init__(self) -> None:
        _check("listen", parse_listen, self.listen)
        _check_path("data_dir", self.data_dir, required=True)
        if not 1024 <= self.max_body_bytes <= 16 * 1024 * 1024:
            raise ValueError("max_body_bytes: must be between 1024 and 16777216")
        if not 1 <= self.request_skew_s <= 3600:
            raise ValueError("request_skew_s: must be between 1 and 3600")
        if not 0 <= self.request_future_skew_s <= MAX_FUTURE_SKEW_S:
            raise ValueError(f"request_future_skew_s: must be between 0 and {MAX_FUTURE_SKEW_S:g}")
        if not 1 <= self.longpoll_timeout_s <= 300:
            raise ValueError("longpoll_timeout_s: must be between 1 and 300")
        _check_rate_limit(self.rate_limit_per_s, self.rate_limit_burst)
        if not 0 <= self.audit_retention_days <= 36500:
            raise ValueError("audit_retention_days: must be between 0 (keep all) and 36500")
        try:
            validate_dimensions(self.dimensions)
        except InvalidInput as e:
            raise ValueError(f"dimensions: {e.message}") from None


class AgentConfig(_Strict):
    server: str = "http://" + DEFAULT_SERVER_LISTEN
    state_dir: str = "/var/lib/segd/agent"
    activation_code: str = ""
    hostname: str = ""
    docker_url: str = "unix:///var/run/docker.sock"
    reconcile_interval_s: float = 30.0
    isolate_unkeyed: bool = True
    server_ca: str = ""
    backoff_max_s: float = 30.0
    flow_interval_s: float = 15.0
    metrics_listen: str = ""  # "" = off; loopback only

    def __post_init__(self) -> None:
        if not self.server.startswith(("http://", "https://")):
            raise ValueError("server: must be an http:// or https:// URL")
        _check_path("state_dir", self.state_dir, required=True)
        if self.hostname and not contract.HOSTNAME_RE.match(self.hostname):
            raise ValueError(
                "hostname: use letters, digits, '_', '.', '-', starting with a letter or digit, "
                "max 253 (the server refuses anything else)"
            )
        _check_path("server_ca", self.server_ca)
        if not 0.5 <= self.reconcile_interval_s <= 3600:
            raise ValueError("reconcile_interval_s: must be between 0.5 and 3600")
        if not 0.1 <= self.backoff_max_s <= 600:
            raise ValueError("backoff_max_s: must be between 0.1 and 600")
        if not 15 <= self.flow_interval_s <= 60:
            raise ValueError("flow_interval_s: must be between 15 and 60")
        if self.metrics_listen:
            _check("metrics_listen", _loopback_listen, self.metrics_listen)


class OrchestratorConfig(_Strict):
    listen: str = DEFAULT_ORCH_LISTEN
    data_dir: str = "/var/lib/segd/orchestrator"
    max_body_bytes: int = 65536
    rate_limit_per_s: float = DEFAULT_RATE_LIMIT_PER_S
    rate_limit_burst: int = DEFAULT_RATE_LIMIT_BURST
    tls: TLSConfig = msgspec.field(default_factory=TLSConfig)
    connections: ConnectionLimits = msgspec.field(default_factory=ConnectionLimits)
    dimensions: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_DIMENSIONS))
    register_local_node: bool = True  # add node `local` (the Docker socket) on first start
    container_labels: dict[str, str] = {}  # extra Docker labels on every container it starts

    def __post_init__(self) -> None:
        _check("listen", parse_listen, self.listen)
        _check_path("data_dir", self.data_dir, required=True)
        if not 1024 <= self.max_body_bytes <= 16 * 1024 * 1024:
            raise ValueError("max_body_bytes: must be between 1024 and 16777216")
        _check_rate_limit(self.rate_limit_per_s, self.rate_limit_burst)
        try:
            validate_dimensions(self.dimensions)
        except InvalidInput as e:
            raise ValueError(f"dimensions: {e.message}") from None
        for k in self.container_labels:
            if not k or contract.is_reserved(k):
                raise ValueError(f"container_labels: {k!r} is empty or reserved")


class Config(_Strict):
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)
    orchestrator: OrchestratorConfig = msgspec.field(default_factory=OrchestratorConfig)


_AT_RE = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_FIELD_RE = re.compile(r"^([a-z_]+): (.*)$", re.S)
_UNKNOWN_RE = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`$")


def _explain(err: msgspec.ValidationError) -> tuple[str, str]:
    m = _AT_RE.match(str(err))
    assert m is not None
    msg, path = m.group("msg"), (m.group("path") or "").lstrip(".")
    path = re.sub(r"\[(\d+)\]", r"[\1]", path)
    field = _FIELD_RE.match(msg)
    if field:
        path = f"{path}.{field.group(1)}" if path else field.group(1)
        msg = field.group(2)
    unk = _UNKNOWN_RE.match(msg)
    if unk:
        key = f"{path}.{unk.group('field')}" if path else unk.group("field")
        return key, "unknown key"
    return path, msg


def decode(data: dict[str, object], path: str = "") -> Config:
    try:
        return msgspec.convert(data, Config, strict=True)
    except msgspec.ValidationError as e:
        key, reason = _explain(e)
        raise ConfigError(path, key, reason) from None


def load(path: str | Path | None) -> Config:
    """Load and validate a config file; None means embedded defaults."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), "", f"cannot read file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), "", f"invalid TOML: not UTF-8 (byte {e.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(p), "", f"invalid TOML: {e}") from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise ConfigError(str(p), "", "invalid TOML: values nested too deeply") from None
    return decode(data, str(p))
