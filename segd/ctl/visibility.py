"""`segd ctl` verbs of visibility: modes, flows and explain.

segd ctl profile set-mode web visibility --visibility blocked+allowed
segd ctl workload set-mode w_0123456789abcdef idle      # or: inherit
segd ctl flow list --src role=web --verdict blocked --since 10m
segd ctl flow watch --dst role=db --json                # one JSON flow a line, live
segd ctl explain web-1 db-1 5432/tcp
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import msgspec

from segd import wire
from segd.ctl import render
from segd.ctl.client import ApiClient, CtlError

Verb = Callable[[ApiClient, argparse.Namespace], None]
MODES = ("full", "visibility", "idle")
LEVELS = ("off", "blocked", "blocked+allowed", "enhanced")
VERDICTS = ("allowed", "blocked", "potentially_blocked")
_flow = msgspec.json.Decoder(wire.Flow)


def _seg(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _print_json(raw: bytes) -> None:
    print(msgspec.json.format(raw, indent=2).decode())


# ---- modes ----------------------------------------------------------------------------


def profile_set_mode(api: ApiClient, a: argparse.Namespace) -> None:
    body = wire.ProfileModeIn(
        mode=a.mode, visibility=a.visibility if a.visibility else msgspec.UNSET
    )
    raw = api.call("PUT", f"/v1/profiles/{_seg(a.name)}/mode", body)
    if a.json:
        _print_json(raw)
        return
    p = msgspec.json.decode(raw, type=wire.Profile)
    print(f"profile {p.name}: mode {p.mode}, visibility {p.visibility}")


def workload_set_mode(api: ApiClient, a: argparse.Namespace) -> None:
    body = wire.WorkloadModeIn(mode=None if a.mode == "inherit" else a.mode)
    raw = api.call("PUT", f"/v1/workloads/{_seg(a.id)}/mode", body)
    if a.json:
        _print_json(raw)
        return
    w = msgspec.json.decode(raw, type=wire.Workload)
    own = "its own" if w.mode_override else "its profile's"
    print(f"workload {w.id}: mode {w.mode} ({own})")


# ---- flows ----------------------------------------------------------------------------


def end_text(e: wire.FlowEnd) -> str:
    if e.kind == "workload":
        return f"{render.labels_text(e.labels) or e.workload_id} ({e.ip})"
    if e.kind == "unpaired":
        return f"unpaired {e.container_id[:12]}@{e.host_id}"
    return f"external {e.ip}"


def _port_text(f: wire.Flow) -> str:
    return f.proto if f.proto in ("icmp", "other") else f"{f.port}/{f.proto}"


def flow_row(f: wire.Flow) -> tuple[str, ...]:
    return (
        render.when(f.last_seen),
        end_text(f.src),
        end_text(f.dst),
        _port_text(f),
        f.verdict,
        f.rule_id or "-",
        str(f.connections),
        str(f.bytes),
        f.reported_by,
    )


FLOW_HEADERS = (
    *("LAST_SEEN", "SRC", "DST", "PORT", "VERDICT", "RULE", "CONNS", "BYTES", "REPORTED_BY"),
)


def _filter_query(a: argparse.Namespace) -> dict[str, str | int]:
    q: dict[str, str | int] = {}
    if a.src:
        q["src"] = render.labels_text(render.parse_labels(a.src))
    if a.dst:
        q["dst"] = render.labels_text(render.parse_labels(a.dst))
    for name in ("verdict", "workload", "rule"):
        if getattr(a, name):
            q[name] = getattr(a, name)
    if a.port is not None:
        q["port"] = a.port
    if getattr(a, "since", None):
        q["since"] = f"{time.time() - render.parse_lifespan(a.since):.3f}"
    return q


def flow_list(api: ApiClient, a: argparse.Namespace) -> None:
    """Newest first, up to --limit flows (fetched a page at a time)."""
    query = _filter_query(a)
    flows: list[wire.Flow] = []
    cursor = ""
    while len(flows) < a.limit:
        q = {**query, "limit": min(1000, a.limit - len(flows))}
        if cursor:
            q["cursor"] = cursor
        page = api.get(wire.FlowPage, "GET", "/v1/flows", query=q)
        flows += page.flows
        cursor = page.next
        if not cursor:
            break
    if a.json:
        print(msgspec.json.format(msgspec.json.encode(flows), indent=2).decode())
    else:
        print(render.table(FLOW_HEADERS, [flow_row(f) for f in flows]))


def flow_watch(api: ApiClient, a: argparse.Namespace) -> None:
    """Flows as they are reported, until interrupted: a row each (or a JSON line)."""
    kind = ""
    if not a.json:
        print("  ".join(FLOW_HEADERS), flush=True)
    for raw in api.lines("/v1/flows/stream", _filter_query(a)):
        line = raw.rstrip(b"\r\n")
        if line.startswith(b"event: "):
            kind = line[7:].decode()
        elif line.startswith(b"data: "):
            _watch_event(kind, line[6:], a.json)


def _watch_event(kind: str, data: bytes, as_json: bool) -> None:
    if kind == "lost":
        lost = msgspec.json.decode(data, type=dict[str, int]).get("lost", 0)
        print(f"segd ctl: this stream missed {lost} flows (reading too slowly)", file=sys.stderr)
        return
    if kind != "flow":
        return
    try:
        f = _flow.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise CtlError("segd server sent a malformed flow") from None
    if as_json:
        print(data.decode(), flush=True)
    else:
        print("  ".join(flow_row(f)), flush=True)


# ---- explain --------------------------------------------------------------------------


def explain(api: ApiClient, a: argparse.Namespace) -> None:
    raw = api.call("GET", "/v1/explain", query={"src": a.src, "dst": a.dst, "port": a.port})
    if a.json:
        _print_json(raw)
        return
    e = msgspec.json.decode(raw, type=wire.Explanation)
    port = e.proto if e.proto == "icmp" else f"{e.port}/{e.proto}"
    print(f"{end_text(e.src)} -> {end_text(e.dst)} {port}: {e.verdict} ({e.reason})")
    print(f"  {e.message}")
    for step in e.steps:
        print(f"  - {step}")


# ---- parsers --------------------------------------------------------------------------


def _filters(v: argparse.ArgumentParser, *, since: bool) -> None:
    v.add_argument("--src", metavar="LABELS", help="labels the source has, e.g. role=web")
    v.add_argument("--dst", metavar="LABELS", help="labels the destination has")
    v.add_argument("--verdict", choices=VERDICTS)
    v.add_argument("--workload", metavar="ID", help="a workload at either end")
    v.add_argument("--port", type=int, metavar="PORT")
    v.add_argument("--rule", metavar="RULE_ID")
    if since:
        v.add_argument("--since", metavar="DURATION", help="last seen within, e.g. 10m, 2h")


def add_verbs(
    group: Callable[[str, str], Any],
    verb: Callable[..., argparse.ArgumentParser],
    groups: dict[str, Any],
) -> None:
    """Add the visibility verbs: to the `profile` and `workload` groups (in
    `groups`), and the `flow` group and `explain`."""
    v = verb(groups["profile"], "set-mode", profile_set_mode, "set a profile's mode", json=True)
    v.add_argument("name")
    v.add_argument("mode", choices=MODES)
    v.add_argument("--visibility", choices=LEVELS, help="what its agents report")
    v = verb(
        groups["workload"], "set-mode", workload_set_mode, "set a workload's own mode", json=True
    )
    v.add_argument("id")
    v.add_argument("mode", choices=(*MODES, "inherit"), help="inherit: its profile's")
    flow = group("flow", "flows the agents report")
    v = verb(flow, "list", flow_list, "flows, newest first", json=True)
    _filters(v, since=True)
    v.add_argument("--limit", type=int, default=100, metavar="N")
    v = verb(flow, "watch", flow_watch, "flows as they are reported (until ^C)", json=True)
    _filters(v, since=False)
    v = verb(groups["top"], "explain", explain, "what happens to a connection, and why", json=True)
    v.add_argument("src", help="workload id, container name or address")
    v.add_argument("dst", help="workload id, container name or address")
    v.add_argument("port", metavar="PORT[/PROTO]", help="e.g. 5432, 53/udp, icmp")
