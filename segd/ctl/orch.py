"""`segd ctl orch`: the orchestrator's admin client.

    segd ctl orch profile add web --image segd-busybox --cmd 'sleep 1d' \\
        --labels role=web,app=shop --key "$(segd ctl key issue web)"
    segd ctl orch node add edge1 --endpoint tcp://10.0.0.5:2376 \\
        --tls-cert c.pem --tls-key k.pem --tls-ca ca.pem
    segd ctl orch run web --count 2
    segd ctl key issue web | segd ctl orch profile set-key web --key -
    segd ctl orch ps --json
    segd ctl orch change web-1a2b3c4d api
    segd ctl orch rm web-1a2b3c4d

Where the orchestrator is (first match wins):

- URL: `--server URL`; the `server` given by `segd ctl`; `$SEGD_ORCH_SERVER`;
  `http://127.0.0.1:7401`, or `http://127.0.0.1:7400` (the all-in-one's
  listener) when there is no standalone orchestrator token but an all-in-one
  data dir.
- admin token: the file of `--token-file F`; the `token` given by `segd ctl`;
  `$SEGD_ORCH_TOKEN`; the file `/var/lib/segd/orchestrator/admin.token`, then
  `orchestrator/admin.token` in the all-in-one data dir (`$SEGD_DATA_DIR`,
  default /var/lib/segd/allinone).

`--key -` reads the pairing key from stdin (keeps it out of shell history).
Listings print aligned tables, or JSON with `--json`. A failure is one line on
stderr, exit status 2 for usage errors and 1 for the rest; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from segd.ctl.client import CtlError
from segd.ctl.render import labels_text, parse_labels, table, when
from segd.http import client as http
from segd.orchestrator import wire as owire

ENV_SERVER = "SEGD_ORCH_SERVER"
ENV_TOKEN = "SEGD_ORCH_TOKEN"  # noqa: S105 - a variable name
ENV_DATA_DIR = "SEGD_DATA_DIR"
DEFAULT_SERVER = "http://127.0.0.1:7401"
# `segd allinone` serves the orchestrator's routes on the server's listener.
ALLINONE_SERVER = "http://127.0.0.1:7400"
DEFAULT_TOKEN_FILE = "/var/lib/segd/orchestrator/admin.token"  # noqa: S105 - a file name
ALLINONE_DIR = "/var/lib/segd/allinone"
TIMEOUT_S = 120.0  # a run of many containers takes a while

PROG = "segd ctl orch"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        where = self.prog[len(PROG) :].strip()
        raise CtlError(f"{where}: {message}" if where else message, 2)


# ---- finding the orchestrator -------------------------------------------------------


def _allinone_dir() -> Path:
    return Path(os.environ.get(ENV_DATA_DIR) or ALLINONE_DIR)


def _use_allinone() -> bool:
    """No standalone orchestrator here, but an all-in-one data dir is."""
    return not Path(DEFAULT_TOKEN_FILE).exists() and (_allinone_dir() / "orchestrator").exists()


def resolve_server(flag: str | None, given: str | None) -> str:
    default = ALLINONE_SERVER if _use_allinone() else DEFAULT_SERVER
    url = flag or given or os.environ.get(ENV_SERVER) or default
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise CtlError(f"invalid orchestrator URL {url!r}: expected http://HOST:PORT", 2)
    return url.rstrip("/")


def resolve_token(flag: str | None, given: str | None) -> str:
    if flag:
        return _read_token(Path(flag))
    if given:
        return given
    env = os.environ.get(ENV_TOKEN, "").strip()
    if env:
        return env
    allinone = _allinone_dir() / "orchestrator" / "admin.token"
    path = allinone if _use_allinone() else Path(DEFAULT_TOKEN_FILE)
    return _read_token(path, hint=f" (use --token-file or {ENV_TOKEN})")


def _read_token(path: Path, hint: str = "") -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise CtlError(f"cannot read admin token {path}: {e.strerror}{hint}") from None
    if not token:
        raise CtlError(f"admin token file {path} is empty")
    return token


class Client(http.Client):
    """The orchestrator's admin API (`segd.http.client.Client`)."""

    def __init__(self, server: str, token: str, timeout: float = TIMEOUT_S) -> None:
        super().__init__(server, token, peer=http.ORCHESTRATOR, timeout=timeout)


# ---- text ---------------------------------------------------------------------------


def parse_env(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise CtlError(f"invalid --env {item!r}: expected NAME=VALUE", 2)
        out[k] = v
    return out


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _containers(items: list[dict[str, Any]]) -> str:
    return table(
        ["ID", "NAME", "NODE", "PROFILE", "STATE", "LABELS", "KEY", "CREATED"],
        [
            [
                c["id"][:12],
                c["name"],
                c["node"],
                c["profile"],
                c["state"],
                labels_text(c["labels"]),
                c["pairing_key"],
                when(c["created_at"]),
            ]
            for c in items
        ],
    )


# ---- verbs --------------------------------------------------------------------------


def _key(value: str) -> str:
    if value == "-":
        value = sys.stdin.readline()
    value = value.strip()
    if not value:
        raise CtlError("--key: the pairing key is empty", 2)
    return value


def profile_add(api: Client, a: argparse.Namespace) -> None:
    try:
        command = shlex.split(a.cmd) if a.cmd else []
    except ValueError as e:
        raise CtlError(f"--cmd: {e}", 2) from None
    body = owire.ProfileIn(
        name=a.name,
        image=a.image,
        pairing_key=_key(a.key),
        command=command,
        env=parse_env(a.env),
        networks=a.network,
        labels=parse_labels(a.labels),
        description=a.description,
    )
    p = api.json("POST", "/v1/orch/profiles", body)
    print(f"added container profile {p['name']} (key {p['pairing_key']})")


def profile_set_key(api: Client, a: argparse.Namespace) -> None:
    ref = urllib.parse.quote(a.name, safe="")
    p = api.json("PUT", f"/v1/orch/profiles/{ref}/key", owire.KeyIn(pairing_key=_key(a.key)))
    print(f"container profile {p['name']} now starts containers with key {p['pairing_key']}")


def profile_list(api: Client, a: argparse.Namespace) -> None:
    items = api.json("GET", "/v1/orch/profiles")
    if a.json:
        return _print_json(items)
    rows = [
        [
            p["name"],
            p["image"],
            shlex.join(p["command"]),
            labels_text(p["labels"]),
            ",".join(p["networks"]),
            p["pairing_key"],
            p["description"],
        ]
        for p in items
    ]
    print(table(["NAME", "IMAGE", "COMMAND", "LABELS", "NETWORKS", "KEY", "DESCRIPTION"], rows))


def profile_rm(api: Client, a: argparse.Namespace) -> None:
    api.json("DELETE", "/v1/orch/profiles/" + urllib.parse.quote(a.name, safe=""))
    print(f"removed container profile {a.name}")


def node_add(api: Client, a: argparse.Namespace) -> None:
    def path(p: str) -> str:
        return str(Path(p).resolve()) if p else ""

    body = owire.NodeIn(
        name=a.name,
        endpoint=a.endpoint,
        tls_cert=path(a.tls_cert),
        tls_key=path(a.tls_key),
        tls_ca=path(a.tls_ca),
    )
    n = api.json("POST", "/v1/orch/nodes", body)
    print(f"added node {n['name']} ({n['endpoint']})")


def node_list(api: Client, a: argparse.Namespace) -> None:
    items = api.json("GET", "/v1/orch/nodes")
    if a.json:
        return _print_json(items)
    rows = [
        [n["name"], n["endpoint"], "yes" if n["tls_cert"] or n["tls_ca"] else "no"] for n in items
    ]
    print(table(["NAME", "ENDPOINT", "TLS"], rows))


def node_rm(api: Client, a: argparse.Namespace) -> None:
    api.json("DELETE", "/v1/orch/nodes/" + urllib.parse.quote(a.name, safe=""))
    print(f"removed node {a.name}")


def run(api: Client, a: argparse.Namespace) -> None:
    body = owire.RunIn(profile=a.profile, node=a.node or None, count=a.count)
    items = api.json("POST", "/v1/orch/run", body)
    if a.json:
        return _print_json(items)
    print(_containers(items))


def ps(api: Client, a: argparse.Namespace) -> None:
    path = "/v1/orch/containers"
    if a.node:
        path += "?" + urllib.parse.urlencode({"node": a.node})
    items = api.json("GET", path)
    if a.json:
        return _print_json(items)
    print(_containers(items))


def rm(api: Client, a: argparse.Namespace) -> None:
    r = api.json("DELETE", "/v1/orch/containers/" + urllib.parse.quote(a.container, safe=""))
    note = " (it was already gone from the node)" if r["was_gone"] else ""
    print(f"removed {r['id'][:12]} ({r['name']}) on {r['node']}{note}")


def change(api: Client, a: argparse.Namespace) -> None:
    ref = urllib.parse.quote(a.container, safe="")
    r = api.json("POST", f"/v1/orch/containers/{ref}/change", owire.ChangeIn(profile=a.profile))
    if a.json:
        return _print_json(r)
    print(f"replaced {r['old'][:12]} with:")
    print(_containers([r["new"]]))


# ---- parser -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="the orchestrator's admin client")
    p.add_argument("--server", metavar="URL", help="orchestrator URL")
    p.add_argument("--token-file", metavar="F", help="file holding the admin token")
    groups = p.add_subparsers(dest="group", metavar="GROUP", required=True, parser_class=_Parser)

    def verb(
        sub: argparse._SubParsersAction[_Parser],
        name: str,
        fn: Callable[[Client, argparse.Namespace], None],
        help_text: str,
        *,
        json_flag: bool = False,
    ) -> _Parser:
        v = sub.add_parser(name, help=help_text, description=help_text)
        v.set_defaults(fn=fn, json=False)
        if json_flag:
            v.add_argument("--json", action="store_true", help="print JSON")
        return v

    def group(name: str, help_text: str) -> argparse._SubParsersAction[_Parser]:
        g = groups.add_parser(name, help=help_text)
        return g.add_subparsers(dest="verb", metavar="VERB", required=True)

    prof = group("profile", "container profiles")
    v = verb(prof, "add", profile_add, "add a container profile")
    v.add_argument("name")
    v.add_argument("--image", required=True)
    v.add_argument("--cmd", default="", help="command, split like a shell would")
    v.add_argument("--env", action="append", default=[], metavar="K=V")
    v.add_argument("--network", action="append", default=[], metavar="N")
    v.add_argument("--labels", default="", metavar="DIM=VALUE,...")
    v.add_argument("--key", required=True, metavar="TOKEN", help="pairing key ('-': stdin)")
    v.add_argument("--description", default="")
    v = verb(prof, "set-key", profile_set_key, "give a profile a new pairing key")
    v.add_argument("name")
    v.add_argument("--key", required=True, metavar="TOKEN", help="pairing key ('-': stdin)")
    verb(prof, "list", profile_list, "list container profiles", json_flag=True)
    verb(prof, "rm", profile_rm, "remove a container profile").add_argument("name")

    node = group("node", "Docker nodes")
    v = verb(node, "add", node_add, "add a node")
    v.add_argument("name")
    v.add_argument("--endpoint", required=True, metavar="URL", help="unix:///PATH or tcp://H:P")
    v.add_argument("--tls-cert", default="", metavar="F")
    v.add_argument("--tls-key", default="", metavar="F")
    v.add_argument("--tls-ca", default="", metavar="F")
    verb(node, "list", node_list, "list nodes", json_flag=True)
    verb(node, "rm", node_rm, "remove a node").add_argument("name")

    v = verb(groups, "run", run, "start containers of a profile", json_flag=True)
    v.add_argument("profile")
    v.add_argument("--node", default="")
    v.add_argument("--count", type=int, default=1, metavar="K")
    verb(groups, "ps", ps, "list the containers started", json_flag=True).add_argument(
        "--node", default=""
    )
    verb(groups, "rm", rm, "remove a container").add_argument("container")
    v = verb(groups, "change", change, "replace a container by another profile's", json_flag=True)
    v.add_argument("container")
    v.add_argument("profile")
    return p


def orch_main(argv: list[str], *, server: str | None = None, token: str | None = None) -> int:
    """Run one `segd ctl orch` command; `server`/`token` come from `segd ctl` flags."""
    try:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else 0
        api = Client(resolve_server(args.server, server), resolve_token(args.token_file, token))
        args.fn(api, args)
    except CtlError as e:
        print(f"{PROG}: {e.message}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
    return 0
