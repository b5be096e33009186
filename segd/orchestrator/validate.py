"""Checks on orchestrator input beyond types: names, images, labels, endpoints.

msgspec refuses wrong shapes and the bounds the wire types state with
`msgspec.Meta` (how many arguments, variables, networks, containers); this
module refuses the other wrong values with a message that names the field (and
never echoes a pairing key). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import msgspec

from segd import contract, policy
from segd.errors import InvalidInput
from segd.orchestrator import wire
from segd.server import tokens
from segd.server.validate import NAME_RE as NAME_RE
from segd.server.validate import name as name

IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}\Z")
NETWORK_RE = contract.CONTAINER_ID_RE  # Docker network names
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
KEY_RE = re.compile(r"^[\x21-\x7e]{1,4096}\Z")  # printable ASCII, no spaces
REF_RE = contract.CONTAINER_ID_RE  # a container id or name
TCP_RE = re.compile(r"^tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})\Z")

MAX_DESCRIPTION = 500
MAX_ARG = 4096
MAX_PATH = 4096
# stated by the wire types (`msgspec.Meta`), checked when a body is decoded
MAX_ARGS = wire.MAX_ARGS
MAX_ENV = wire.MAX_ENV
MAX_NETWORKS = wire.MAX_NETWORKS
MAX_RUN = wire.MAX_RUN


class Endpoint(msgspec.Struct, frozen=True):
    """A Docker Engine address: a unix socket path, or a TCP host and port."""

    scheme: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0


def _plain(field: str, value: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidInput(f"{field}: longer than {limit} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidInput(f"{field}: control characters are not allowed")
    return value


def container_ref(value: str) -> str:
    if not REF_RE.match(value):
        raise InvalidInput(f"invalid container id or name {value!r}")
    return value


def profile(p: wire.ProfileIn, dimensions: Iterable[str]) -> wire.ProfileIn:
    """The profile with its label set sorted, or InvalidInput."""
    name("name", p.name)
    if not IMAGE_RE.match(p.image):
        raise InvalidInput(f"image: invalid image reference {p.image!r}")
    pairing_key(p.pairing_key)
    for i, arg in enumerate(p.command):
        if len(arg) > MAX_ARG or "\0" in arg:
            raise InvalidInput(f"command[{i}]: longer than {MAX_ARG} characters or has NUL")
    for k, v in p.env.items():
        if not ENV_KEY_RE.match(k):
            raise InvalidInput(f"env: invalid variable name {k!r}")
        if len(v) > MAX_ARG or "\0" in v:
            raise InvalidInput(f"env.{k}: longer than {MAX_ARG} characters or has NUL")
    networks(p.networks)
    try:
        labels = policy.validate_labels(p.labels, dimensions)
    except InvalidInput as e:
        raise InvalidInput(f"labels: {e.message}") from None
    _plain("description", p.description, MAX_DESCRIPTION)
    return msgspec.structs.replace(p, labels=labels)


def pairing_key(value: str) -> str:
    if not KEY_RE.match(value):
        # Never echo the value: it is a secret.
        raise InvalidInput("pairing_key: must be 1-4096 printable ASCII characters without spaces")
    return value


def key_expiry(token: str) -> int | None:
    """When a pairing key expires, read from its claims; None when it has none to
    read. Not a verification: the server checks the signature when it pairs."""
    try:
        return tokens.parse(token)[0].exp
    except tokens.TokenError:
        return None


def networks(nets: list[str]) -> None:
    if len(set(nets)) != len(nets):
        raise InvalidInput("networks: each network at most once")
    for n in nets:
        if not NETWORK_RE.match(n):
            raise InvalidInput(f"networks: invalid network name {n!r}")
        if n == "host":
            raise InvalidInput("networks: 'host' shares the host namespace and cannot be segmented")
    if "none" in nets and len(nets) > 1:
        raise InvalidInput("networks: 'none' cannot be combined with other networks")


def endpoint(text: str) -> Endpoint:
    """`unix:///var/run/docker.sock` or `tcp://HOST:PORT`."""
    if text.startswith("unix://"):
        path = text[len("unix://") :]
        if not path.startswith("/") or len(path) > MAX_PATH or "\0" in path:
            raise InvalidInput(f"endpoint: invalid unix socket URL {text!r}: use unix:///PATH")
        return Endpoint("unix", path=path)
    m = TCP_RE.match(text)
    if not m:
        raise InvalidInput(
            f"endpoint: invalid endpoint {text!r}: use unix:///PATH or tcp://HOST:PORT"
        )
    port = int(m.group(2))
    if not 0 < port < 65536:
        raise InvalidInput(f"endpoint: invalid port in {text!r}")
    return Endpoint("tcp", host=m.group(1).strip("[]"), port=port)


def node(n: wire.NodeIn) -> Endpoint:
    name("name", n.name)
    ep = endpoint(n.endpoint)
    for field, value in (("tls_cert", n.tls_cert), ("tls_key", n.tls_key), ("tls_ca", n.tls_ca)):
        _plain(field, value, MAX_PATH)
        if value and not value.startswith("/"):
            raise InvalidInput(f"{field}: must be an absolute path")
    has_tls = bool(n.tls_cert or n.tls_key or n.tls_ca)
    if has_tls and ep.scheme != "tcp":
        raise InvalidInput("tls_cert/tls_key/tls_ca: only for tcp:// endpoints")
    if bool(n.tls_cert) != bool(n.tls_key):
        raise InvalidInput("tls_cert/tls_key: give both or neither")
    return ep


def run(r: wire.RunIn) -> wire.RunIn:
    name("profile", r.profile)
    if r.node is not None:
        name("node", r.node)
    return r
