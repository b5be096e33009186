"""`segd ctl`: the admin client of the segmentation server.

    segd ctl rule add --provider role=db,app=shop --consumer role=web --service tcp/5432
    segd ctl profile add web --labels role=web,app=shop --lock role,app --max-uses 5
    segd ctl key issue web --lifespan 30m          # prints the token alone
    segd ctl workload list --json
    segd ctl admin rotate-token                    # a new admin token, every other refused
    segd ctl key revoke k_0123456789abcdef --unpair

Listings print aligned tables, or the server's JSON with `--json`. A failure is
one line on stderr and exit status 1 (2 for usage errors); never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import msgspec

from segd import files, wire
from segd.ctl import render
from segd.ctl.client import (
    ENV_CA,
    ApiClient,
    CtlError,
    read_token_file,
    resolve_server,
    resolve_token_source,
)

T = TypeVar("T")
Verb = Callable[[ApiClient, argparse.Namespace], None]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("segd ctl").strip()
        raise CtlError(f"{where}: {message}" if where else message, 2)


def _decode(raw: bytes, t: type[T]) -> T:
    return msgspec.json.decode(raw, type=t)


def _out(text: str) -> None:
    print(text)


def _print_json(raw: bytes) -> None:
    _out(msgspec.json.format(raw, indent=2).decode())


def _show(raw: bytes, args: argparse.Namespace, render_text: Callable[[bytes], str]) -> None:
    """The server's JSON with --json, else the rendered text."""
    if args.json:
        _print_json(raw)
    else:
        _out(render_text(raw))


# ---- rules --------------------------------------------------------------------------


def rule_add(api: ApiClient, a: argparse.Namespace) -> None:
    providers, provider_ips = render.parse_side(a.provider)
    consumers, consumer_ips = render.parse_side(a.consumer)
    body = wire.RuleIn(
        providers=providers,
        consumers=consumers,
        services=a.service,
        options=a.option or [],
        description=a.description,
        provider_ips=provider_ips,
        consumer_ips=consumer_ips,
    )
    raw = api.call("POST", "/v1/rules", body)
    _show(raw, a, lambda r: _decode(r, wire.Rule).id)


def _rules_table(raw: bytes) -> str:
    rows = [
        (
            r.id,
            render.selectors_text(r.providers, r.provider_ips),
            render.selectors_text(r.consumers, r.consumer_ips),
            ",".join(r.services),
            ",".join(r.options),
            r.description,
        )
        for r in _decode(raw, list[wire.Rule])
    ]
    return render.table(
        ("ID", "PROVIDERS", "CONSUMERS", "SERVICES", "OPTIONS", "DESCRIPTION"), rows
    )


def rule_list(api: ApiClient, a: argparse.Namespace) -> None:
    _show(api.call("GET", "/v1/rules"), a, _rules_table)


def rule_rm(api: ApiClient, a: argparse.Namespace) -> None:
    api.call("DELETE", f"/v1/rules/{_seg(a.id)}")
    _out(f"rule {a.id} removed")


# ---- profiles -----------------------------------------------------------------------


def profile_add(api: ApiClient, a: argparse.Namespace) -> None:
    defaults = wire.ProfileIn(name="", labels={})
    body = wire.ProfileIn(
        name=a.name,
        labels=render.parse_labels(a.labels),
        locked=[d.strip() for d in (a.lock or "").split(",") if d.strip()],
        max_uses=defaults.max_uses if a.max_uses is None else render.parse_max_uses(a.max_uses),
        lifespan_s=defaults.lifespan_s if a.lifespan is None else render.parse_lifespan(a.lifespan),
        on_mismatch=a.on_mismatch,
        enabled=not a.disabled,
        description=a.description,
    )
    raw = api.call("POST", "/v1/profiles", body)
    _show(raw, a, lambda r: _decode(r, wire.Profile).name)


def _profiles_table(raw: bytes) -> str:
    rows = [
        (
            p.name,
            render.labels_text(p.labels),
            ",".join(p.locked) or "-",
            render.max_uses_text(p.max_uses),
            render.format_lifespan(p.lifespan_s),
            p.on_mismatch,
            "yes" if p.enabled else "no",
            p.description,
        )
        for p in _decode(raw, list[wire.Profile])
    ]
    return render.table(
        (
            "NAME",
            "LABELS",
            "LOCKED",
            "MAX_USES",
            "LIFESPAN",
            "ON_MISMATCH",
            "ENABLED",
            "DESCRIPTION",
        ),
        rows,
    )


def profile_list(api: ApiClient, a: argparse.Namespace) -> None:
    _show(api.call("GET", "/v1/profiles"), a, _profiles_table)


def profile_rm(api: ApiClient, a: argparse.Namespace) -> None:
    api.call("DELETE", f"/v1/profiles/{_seg(a.name)}")
    _out(f"profile {a.name} removed (its keys no longer pair)")


def _revoke_body(a: argparse.Namespace) -> wire.RevokeIn | None:
    return wire.RevokeIn(unpair=True) if a.unpair else None


def profile_revoke(api: ApiClient, a: argparse.Namespace) -> None:
    raw = api.call("POST", f"/v1/profiles/{_seg(a.name)}/revoke", _revoke_body(a))
    keys = _decode(raw, list[wire.PairingKey])
    unpaired = "; the workloads they paired are unpaired" if a.unpair else ""
    _out(f"profile {a.name}: all {len(keys)} keys are revoked{unpaired}")


# ---- keys ---------------------------------------------------------------------------


def key_issue(api: ApiClient, a: argparse.Namespace) -> None:
    body = wire.KeyIssueIn(
        profile=a.profile,
        max_uses=msgspec.UNSET if a.max_uses is None else render.parse_max_uses(a.max_uses),
        lifespan_s=None if a.lifespan is None else render.parse_lifespan(a.lifespan),
        description=a.description,
    )
    raw = api.call("POST", "/v1/keys", body)
    _show(raw, a, lambda r: _decode(r, wire.KeyIssued).token)


def _key_state(k: wire.PairingKey, now: float) -> str:
    if k.revoked:
        return "revoked"
    if now >= k.expires_at:
        return "expired"
    if k.max_uses is not None and k.uses >= k.max_uses:
        return "used"
    return "active"


def _keys_table(raw: bytes) -> str:
    now = time.time()
    rows = [
        (
            k.key_id,
            k.profile,
            f"{k.uses}/{render.max_uses_text(k.max_uses)}",
            render.when(k.expires_at),
            _key_state(k, now),
            k.description,
        )
        for k in _decode(raw, list[wire.PairingKey])
    ]
    return render.table(("KEY_ID", "PROFILE", "USES", "EXPIRES", "STATE", "DESCRIPTION"), rows)


def key_list(api: ApiClient, a: argparse.Namespace) -> None:
    query: dict[str, str | int] = {"profile": a.profile} if a.profile else {}
    _show(api.call("GET", "/v1/keys", query=query), a, _keys_table)


def key_revoke(api: ApiClient, a: argparse.Namespace) -> None:
    api.call("POST", f"/v1/keys/{_seg(a.key_id)}/revoke", _revoke_body(a))
    unpaired = "; the workloads it paired are unpaired" if a.unpair else ""
    _out(f"key {a.key_id} revoked{unpaired}")


# ---- workloads, hosts, audit, agents ------------------------------------------------


def _workloads_table(raw: bytes) -> str:
    """One row per workload, followed by one per container sharing its namespace
    (no labels or addresses of its own; SHARES names the workload)."""
    rows: list[tuple[str, ...]] = []
    for w in _decode(raw, list[wire.Workload]):
        rows.append(
            (
                w.id,
                w.host_id,
                w.container_id[:12],
                w.name,
                render.labels_text(w.labels),
                ",".join(w.ips),
                render.when(w.paired_at),
                "-",
            )
        )
        rows.extend(
            ("-", w.host_id, s.container_id[:12], s.name, "-", "-", "-", w.id) for s in w.sidecars
        )
    return render.table(
        ("ID", "HOST", "CONTAINER", "NAME", "LABELS", "IPS", "PAIRED", "SHARES"), rows
    )


def workload_list(api: ApiClient, a: argparse.Namespace) -> None:
    _show(api.call("GET", "/v1/workloads"), a, _workloads_table)


def workload_unpair(api: ApiClient, a: argparse.Namespace) -> None:
    api.call("DELETE", f"/v1/workloads/{_seg(a.id)}")
    _out(f"workload {a.id} unpaired (its container stays isolated until it is recreated)")


def _hosts_table(raw: bytes) -> str:
    rows = [
        (
            h.id,
            h.hostname,
            h.workloads,
            h.instructions_version,
            render.when(h.last_seen),
            "revoked" if h.revoked else "active",
            h.mesh,
            h.subnet or "-",
            h.endpoint or "-",
            _short_key(h.mesh_public_key),
        )
        for h in _decode(raw, list[wire.Host])
    ]
    return render.table(
        (
            "ID",
            "HOSTNAME",
            "WORKLOADS",
            "VERSION",
            "LAST_SEEN",
            "STATE",
            "MESH",
            "SUBNET",
            "ENDPOINT",
            "WG_KEY",
        ),
        rows,
    )


def _short_key(key: str) -> str:
    """A WireGuard public key's first characters, as `wg show` users know them."""
    return f"{key[:8]}…" if key else "-"


def host_list(api: ApiClient, a: argparse.Namespace) -> None:
    _show(api.call("GET", "/v1/hosts"), a, _hosts_table)


def host_revoke(api: ApiClient, a: argparse.Namespace) -> None:
    api.call("POST", f"/v1/hosts/{_seg(a.id)}/revoke")
    _out(f"host {a.id} revoked")


def _audit_table(raw: bytes) -> str:
    rows = [
        (
            e.id,
            render.when(e.at),
            e.event,
            e.result,
            e.reason,
            e.host_id,
            e.container_id[:12],
            e.key_id,
            e.detail,
        )
        for e in _decode(raw, list[wire.AuditEntry])
    ]
    return render.table(
        ("ID", "TIME", "EVENT", "RESULT", "REASON", "HOST", "CONTAINER", "KEY", "DETAIL"), rows
    )


def audit_list(api: ApiClient, a: argparse.Namespace) -> None:
    _show(api.call("GET", "/v1/audit", query={"limit": a.limit}), a, _audit_table)


def activation_code(api: ApiClient, a: argparse.Namespace) -> None:
    body = wire.ActivationCodeIn(lifespan_s=render.parse_lifespan(a.lifespan))
    raw = api.call("POST", "/v1/activation-codes", body)
    _show(raw, a, lambda r: _decode(r, wire.ActivationCode).code)


def admin_rotate_token(api: ApiClient, a: argparse.Namespace) -> None:
    """Rotate the admin token. The server writes the new one to its admin.token;
    the token file this command read (if another) gets it too. Taken from the
    environment, the new token is printed alone."""
    raw = api.call("POST", "/v1/admin-token/rotate")
    new = _decode(raw, wire.AdminToken)
    kept = _keep_token(api.token_file, new)
    if a.json:
        _print_json(raw)
    elif kept is None:
        _out(new.token)
    else:
        _out(f"admin token rotated: the new one is in {kept}; every other token is refused")


def _keep_token(path: Path | None, new: wire.AdminToken) -> Path | None:
    if path is None:
        return None
    try:
        if path.read_text().strip() != new.token:  # unless it is the server's own file
            files.write_secret(path, new.token + "\n")
    except OSError as e:
        raise CtlError(
            f"the admin token was rotated, but {path} cannot be written ({e.strerror or e}); "
            f"the server wrote the new one to {new.token_file}; new token: {new.token}"
        ) from None
    return path


def _seg(text: str) -> str:
    """One URL path segment (ids and names never contain '/')."""
    return urllib.parse.quote(text, safe="")


# ---- argument parsing ---------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    # Connection options work before or after the verb; SUPPRESS keeps a value given
    # before the verb from being reset by the verb's own defaults.
    conn = _Parser(add_help=False)
    conn.add_argument(
        "--server",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="server URL (env SEGD_SERVER; default the local allinone)",
    )
    conn.add_argument(
        "--token-file",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="admin token file (env SEGD_TOKEN holds the token itself)",
    )
    conn.add_argument(
        "--ca-file",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"CA bundle for an https server (env {ENV_CA})",
    )

    p = _Parser(prog="segd ctl", description="admin client of the segd server", parents=[conn])
    groups = p.add_subparsers(dest="group", metavar="GROUP", required=True)

    def verb(
        group: argparse._SubParsersAction[Any],
        name: str,
        fn: Verb,
        help: str,
        *,
        json: bool = False,
    ) -> argparse.ArgumentParser:
        v: argparse.ArgumentParser = group.add_parser(name, help=help, parents=[conn])
        v.set_defaults(fn=fn)
        if json:
            v.add_argument("--json", action="store_true", help="print JSON")
        return v

    def group(name: str, help: str) -> argparse._SubParsersAction[Any]:
        g = groups.add_parser(name, help=help)
        return g.add_subparsers(dest="verb", metavar="VERB", required=True)

    rule = group("rule", "allow rules")
    v = verb(rule, "add", rule_add, "add a rule", json=True)
    side_help = "a label set, ip:CIDR (IPv4 or IPv6), or any; repeatable"
    v.add_argument(
        "--provider", action="append", required=True, metavar="LABELS|ip:CIDR|any", help=side_help
    )
    v.add_argument(
        "--consumer", action="append", required=True, metavar="LABELS|ip:CIDR|any", help=side_help
    )
    v.add_argument(
        "--service", action="append", required=True, metavar="tcp/PORT|udp/PORT|tcp/LO-HI|icmp"
    )
    v.add_argument(
        "--option",
        action="append",
        metavar="OPTION",
        help="log (log its accepts) or encrypted (remote peers only through the segd mesh)",
    )
    v.add_argument("--description", default="")
    verb(rule, "list", rule_list, "list rules", json=True)
    verb(rule, "rm", rule_rm, "remove a rule").add_argument("id")

    prof = group("profile", "pairing profiles")
    v = verb(prof, "add", profile_add, "add a pairing profile", json=True)
    v.add_argument("name")
    v.add_argument("--labels", required=True, metavar="dim=value,...")
    v.add_argument("--lock", metavar="dim,...", help="dimensions a request cannot change")
    v.add_argument(
        "--max-uses",
        metavar="N|unlimited",
        help="new containers each key admits (default unlimited); restarts use none",
    )
    v.add_argument("--lifespan", metavar="DURATION", help="key lifespan, e.g. 30m, 1h")
    v.add_argument("--on-mismatch", choices=("deny", "default"), default="deny")
    v.add_argument("--description", default="")
    v.add_argument("--disabled", action="store_true", help="create it disabled")
    verb(prof, "list", profile_list, "list pairing profiles", json=True)
    verb(prof, "rm", profile_rm, "remove a profile and its keys").add_argument("name")
    v = verb(prof, "revoke", profile_revoke, "revoke every key of a profile")
    v.add_argument("name")
    v.add_argument("--unpair", action="store_true", help="also unpair what its keys paired")

    key = group("key", "pairing keys")
    v = verb(key, "issue", key_issue, "issue a pairing key (prints the token)", json=True)
    v.add_argument("profile")
    v.add_argument(
        "--max-uses", metavar="N|unlimited", help="new containers it admits (default: profile's)"
    )
    v.add_argument("--lifespan", metavar="DURATION", help="e.g. 30m, 1h, 2d")
    v.add_argument("--description", default="")
    verb(key, "list", key_list, "list pairing keys", json=True).add_argument("profile", nargs="?")
    v = verb(key, "revoke", key_revoke, "revoke a pairing key")
    v.add_argument("key_id")
    v.add_argument("--unpair", action="store_true", help="also unpair what it paired")

    wl = group("workload", "paired workloads")
    verb(wl, "list", workload_list, "list workloads", json=True)
    verb(
        wl, "unpair", workload_unpair, "unpair a workload; its container stays isolated"
    ).add_argument("id")
    host = group("host", "agent hosts")
    verb(host, "list", host_list, "list hosts", json=True)
    verb(host, "revoke", host_revoke, "revoke a host's agent").add_argument("id")
    v = verb(group("audit", "audit log"), "list", audit_list, "latest audit entries", json=True)
    v.add_argument("--limit", type=int, default=50, metavar="N")
    v = verb(
        group("agent", "agents"),
        "activation-code",
        activation_code,
        "issue a single-use activation code (prints the code)",
        json=True,
    )
    v.add_argument("--lifespan", default="1h", metavar="DURATION")
    verb(
        group("admin", "the admin token"),
        "rotate-token",
        admin_rotate_token,
        "replace the admin token (written where this command read it)",
        json=True,
    )

    # Only listed here for --help: `orch ...` is handed to segd.ctl.orch before parsing.
    groups.add_parser("orch", help="the orchestrator (see `segd ctl orch --help`)")
    return p


_CONN_VALUED = ("--server", "--token-file", "--ca-file")


def _split_orch(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(connection options, orch arguments) when the group is `orch`, else None."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _CONN_VALUED:
            i += 2
        elif arg.partition("=")[0] in _CONN_VALUED:
            i += 1
        elif arg == "orch":
            return argv[:i], argv[i + 1 :]
        else:
            return None
    return None


def _orch(before: list[str], rest: list[str]) -> int:
    """`segd ctl [--server URL] [--token-file F] orch ...`: the orchestrator's client,
    given the server and token only when they were named explicitly before `orch`."""
    from segd.ctl.orch import orch_main

    conn = _Parser(prog="segd ctl", add_help=False)
    for opt in _CONN_VALUED:
        conn.add_argument(opt)
    args = conn.parse_args(before)
    token = read_token_file(args.token_file) if args.token_file else None
    return orch_main(rest, server=args.server, token=token)


def ctl_main(argv: list[str]) -> int:
    try:
        orch = _split_orch(argv)
        if orch is not None:
            return _orch(*orch)
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else 0
        token, token_file = resolve_token_source(getattr(args, "token_file", None))
        api = ApiClient(
            resolve_server(getattr(args, "server", None)),
            token,
            ca_file=getattr(args, "ca_file", None) or _env_ca(),
            token_file=token_file,
        )
        args.fn(api, args)
    except CtlError as e:
        print(f"segd ctl: {e.message}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        return 130
    return 0


def _env_ca() -> str | None:
    return os.environ.get(ENV_CA) or None
