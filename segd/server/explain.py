"""`explain`: what the dataplane does with one connection, and why. Pure: no I/O.

The answer is worked out from the compiled policies the agents enforce (each
workload's `WorkloadPolicy` and the peer sets), the way the container tables
evaluate them (`segd.firewall.render`): a connection from SRC to DST leaves
SRC's table only if one of SRC's outbound allows names DST's address (its peer
set holds it, or the allow is for any address) on a service covering the port,
and enters DST's table only under the same test of DST's inbound allows with
SRC's address. A workload in mode `idle` has no table (it passes all); one in
mode `visibility` passes what it would drop, which is reported
`potentially_blocked`. An address that is no workload is either outside segd
(nothing of segd's on its side) or a container that did not pair, which its
agent isolates. Where no rule allows it, the rules that would if a workload had
other labels are named, and `locked_label` says that a label that differs is
locked by the workload's profile (a container cannot ask for another value).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Mapping, Sequence

from segd import policy, wire
from segd.errors import InvalidInput, NotFound
from segd.server import flowresolve


@dataclasses.dataclass(frozen=True)
class Unpaired:
    """A container whose pairing was refused: its agent isolates it."""

    ip: str
    host_id: str
    container_id: str
    reason: str


End = wire.Workload | Unpaired | str  # a workload, a refused container, another address


@dataclasses.dataclass(frozen=True)
class Model:
    """What `explain` reads: the workloads, their compiled policies and peer sets,
    the rules, each workload's locked dimensions and each host's mesh subnet."""

    workloads: Sequence[wire.Workload]
    policies: Mapping[str, wire.WorkloadPolicy]  # workload id -> its compiled policy
    # host -> set name -> addresses: each host has its own copy of a set (a set holds
    # the host-local addresses of that host's workloads only)
    sets: Mapping[str, Mapping[str, Sequence[str]]]
    rules: Sequence[wire.Rule]
    locked: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    subnets: Mapping[str, str] = dataclasses.field(default_factory=dict)  # host -> mesh CIDR


def parse_port(text: str) -> tuple[wire.FlowProto, int]:
    """`PORT[/PROTO]` (tcp by default) or `icmp`."""
    t = text.strip().lower()
    if t == "icmp":
        return "icmp", 0
    port, sep, proto = t.partition("/")
    proto = proto if sep else "tcp"
    if proto not in ("tcp", "udp") or not (port.isascii() and port.isdigit()):
        raise InvalidInput(f"port: expected PORT, PORT/tcp, PORT/udp or icmp, not {text[:32]!r}")
    n = int(port)
    if not 1 <= n <= 65535:
        raise InvalidInput("port: must be between 1 and 65535")
    return proto, n  # type: ignore[return-value]


def resolve(
    text: str,
    workloads: Sequence[wire.Workload],
    field: str,
    refused: Callable[[str], Unpaired | None] = lambda ip: None,
) -> End:
    """A workload by id, container name or container id (a unique prefix of at
    least 12), else an IP address (`refused` tells a container refused a
    pairing); NotFound or InvalidInput otherwise."""
    t = text.strip()
    if not t or len(t) > 255:
        raise InvalidInput(f"{field}: give a workload id, a container name or an address")
    for w in workloads:
        if w.id == t:
            return w
    by_name = [w for w in workloads if w.name in (t, "/" + t)]
    if len(by_name) > 1:
        raise InvalidInput(f"{field}: {len(by_name)} workloads are named {t!r}: give an id")
    if by_name:
        return by_name[0]
    if len(t) >= 12:
        by_cid = [w for w in workloads if w.container_id.startswith(t)]
        if len(by_cid) == 1:
            return by_cid[0]
    try:
        addr = str(ipaddress.ip_address(t))
    except ValueError:
        raise NotFound(f"{field}: no workload, container name or address {t!r}") from None
    return _by_address(addr, workloads, field) or refused(addr) or addr


def _by_address(addr: str, workloads: Sequence[wire.Workload], field: str) -> wire.Workload | None:
    """The workload holding `addr`; InvalidInput when it is host-local on several hosts."""
    owners = [w for w in workloads if addr in w.ips]
    if len({w.host_id for w in owners}) > 1:
        hosts = ", ".join(sorted({w.host_id for w in owners}))
        raise InvalidInput(
            f"{field}: {addr} is a host-local address on several hosts ({hosts}): give a"
            " workload id or a container name"
        )
    return owners[0] if owners else None


def _address(end: End, peer: End) -> str:
    """The end's address toward `peer` (of the peer's family when it has one)."""
    if isinstance(end, str):
        return end
    if isinstance(end, Unpaired):
        return end.ip
    if isinstance(peer, str):
        return flowresolve.same_family(end.ips, peer)
    return end.ips[0] if end.ips else ""


def flow_end(end: End, ip: str) -> wire.FlowEnd:
    if isinstance(end, str):
        return wire.FlowEnd(ip=ip, kind="external")
    if isinstance(end, Unpaired):
        return wire.FlowEnd(
            ip=ip, kind="unpaired", host_id=end.host_id, container_id=end.container_id
        )
    return flowresolve.workload_end(end, ip)


def _member(ip: str, elements: Sequence[str]) -> bool:
    """`ip` in a set: one of its addresses, or inside one of its blocks (ip: peers)."""
    if ip in elements:
        return True
    blocks = [e for e in elements if "/" in e]
    if not blocks:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(b, strict=False) for b in blocks)


def _covers(services: Sequence[policy.Service], proto: str, port: int) -> bool:
    for s in services:
        if s.proto == proto and (proto == "icmp" or s.port <= port <= s.port_end):
            return True
    return False


def _allowing(
    allows: Sequence[wire.Allow],
    sets: Mapping[str, Sequence[str]],
    peer_ip: str,
    proto: str,
    port: int,
) -> str:
    """The id of the first allow that lets `peer_ip` through on the port, or ""."""
    for a in allows:
        if (a.peer is None or _member(peer_ip, sets.get(a.peer, ()))) and _covers(
            a.services, proto, port
        ):
            return a.rule_id
    return ""


@dataclasses.dataclass(frozen=True)
class _Side:
    verdict: wire.Verdict  # of this side's table alone
    rule_id: str
    step: str


def _side(w: wire.Workload, outbound: bool, peer_ip: str, proto: str, port: int, m: Model) -> _Side:
    way = "out of" if outbound else "into"
    pol = m.policies.get(w.id)
    if w.mode == "idle":
        return _Side("allowed", "", f"{way} {w.id}: mode idle, no table")
    allows = (pol.outbound if outbound else pol.inbound) if pol else []
    rid = _allowing(allows, m.sets.get(w.host_id, {}), peer_ip, proto, port)
    if rid:
        return _Side("allowed", rid, f"{way} {w.id}: rule {rid}")
    if w.mode == "visibility":
        return _Side(
            "potentially_blocked", "", f"{way} {w.id}: no rule; mode visibility lets it pass"
        )
    return _Side("blocked", "", f"{way} {w.id}: no rule, dropped")


def _near_misses(src: End, dst: End, proto: str, port: int, m: Model) -> tuple[list[str], bool]:
    """Rules on the service whose sides a workload end does not match, the labels
    it lacks named; and whether every such miss is on a dimension locked for it."""
    notes: list[str] = []
    all_locked = True
    for r in m.rules:
        if not _covers(policy.parse_services(r.services), proto, port):
            continue
        gaps = [
            gap
            for end, sel in ((src, r.consumers), (dst, r.providers))
            if (gap := _gap(end, sel)) is not None
        ]
        if not gaps or any(g[0] is None for g in gaps):
            continue  # matched (a dataplane lag) or an address no selector names
        for wid, missing in ((g[0], g[1]) for g in gaps):
            locked = set(m.locked.get(wid or "", ()))
            all_locked &= set(missing) <= locked
            text = ",".join(f"{k}={v}" for k, v in sorted(missing.items()))
            notes.append(f"rule {r.id} would allow it if {wid} had {text}")
    return notes, bool(notes) and all_locked


def _gap(end: End, sel: policy.Selectors) -> tuple[str | None, dict[str, str]] | None:
    """None when `end` matches `sel`; else (workload id or None, the labels of the
    closest selector it lacks)."""
    if sel == "any":
        return None
    if not isinstance(end, wire.Workload):
        return None, {}
    best: dict[str, str] | None = None
    for s in sel:
        missing = {k: v for k, v in s.items() if end.labels.get(k) != v}
        if not missing:
            return None
        if best is None or len(missing) < len(best):
            best = missing
    return end.id, best or {}


@dataclasses.dataclass(frozen=True)
class _Ask:
    src: wire.FlowEnd
    dst: wire.FlowEnd
    proto: wire.FlowProto
    port: int

    def answer(
        self,
        verdict: wire.Verdict,
        reason: str,
        message: str,
        rule_id: str = "",
        steps: Sequence[str] = (),
    ) -> wire.Explanation:
        return wire.Explanation(
            verdict=verdict,
            reason=reason,
            message=message,
            src=self.src,
            dst=self.dst,
            proto=self.proto,
            port=self.port,
            rule_id=rule_id,
            steps=list(steps),
        )


def explain(src: End, dst: End, proto: wire.FlowProto, port: int, m: Model) -> wire.Explanation:
    src_ip, dst_ip = _address(src, dst), _address(dst, src)
    ask = _Ask(flow_end(src, src_ip), flow_end(dst, dst_ip), proto, port)
    for side, end in (("src", src), ("dst", dst)):
        if isinstance(end, Unpaired):
            msg = (
                f"{side} {end.ip} is container {end.container_id[:12]} on host {end.host_id}, "
                f"whose pairing was refused ({end.reason}): its agent isolates it"
            )
            return ask.answer("blocked", f"{side}_unpaired", msg)
    if isinstance(src, str) and isinstance(dst, str):
        return ask.answer(
            "allowed", "outside", "neither end is a segd workload: segd does not filter it"
        )
    if isinstance(src, wire.Workload) and isinstance(dst, wire.Workload):
        if src.id == dst.id:
            msg = "a workload reaching itself stays in its namespace (loopback)"
            return ask.answer("allowed", "same_workload", msg)
        if src.host_id != dst.host_id and not _in(dst_ip, m.subnets.get(dst.host_id, "")):
            msg = (
                f"{dst.id} is on host {dst.host_id} and {src.id} on {src.host_id}: the address "
                f"{dst_ip} is local to its host (not in a segd mesh subnet)"
            )
            return ask.answer("blocked", "host_local", msg)
    return _judge(ask, src, dst, m)


def _in(ip: str, cidr: str) -> bool:
    if not cidr or not ip:
        return False
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return False


def _judge(ask: _Ask, src: End, dst: End, m: Model) -> wire.Explanation:
    proto, port, src_ip, dst_ip = ask.proto, ask.port, ask.src.ip, ask.dst.ip
    sides: list[_Side] = []
    others: list[str] = []
    if not isinstance(src, wire.Workload):
        others.append(f"from {src_ip}: not a workload (outside segd, or an unpaired container)")
    else:
        sides.append(_side(src, True, dst_ip, proto, port, m))
    if not isinstance(dst, wire.Workload):
        others.append(f"to {dst_ip}: not a workload (outside segd, or an unpaired container)")
    else:
        sides.append(_side(dst, False, src_ip, proto, port, m))
    steps = [s.step for s in sides] + others
    verdicts = {s.verdict for s in sides}
    if verdicts != {"allowed"}:
        notes, locked = _near_misses(src, dst, proto, port, m)
        if "blocked" in verdicts:
            reason = "locked_label" if locked else "no_rule"
            msg = "dropped: no rule allows it" + (
                " (the labels it needs are locked by the profile)" if locked else ""
            )
            return ask.answer("blocked", reason, msg, steps=steps + notes)
        msg = "no rule allows it; it passes because of mode visibility"
        return ask.answer("potentially_blocked", "mode_visibility", msg, steps=steps + notes)
    rule_id = next((s.rule_id for s in sides if s.rule_id), "")
    idle = any(not s.rule_id for s in sides)
    msg = f"allowed by rule {rule_id}" if rule_id else "allowed: no segd table on its way"
    if idle and rule_id:
        msg += " (the other end is in mode idle)"
    if others:
        msg += "; an unpaired container at that address would still be isolated by its agent"
    return ask.answer("allowed", "mode_idle" if idle else "rule", msg, rule_id, steps)
