"""The mesh's root work: the WireGuard interface, its peers and routes, and
Docker's `DOCKER-USER` accepts. Blocking calls; the caller runs them off the
event loop (`segd.agent.mesh`).

Userspace WireGuard is Debian's `wireguard-go`, started daemonized so that it
outlives the agent (the mesh, like the gate, stays up when the agent stops) and
driven over its UAPI socket `/var/run/wireguard/NAME.sock`. Kernel WireGuard is
made and configured through pyroute2 (rtnetlink and the WireGuard generic
netlink family). Routes and iptables go through `ip` and `iptables`.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from segd.mesh import uapi
from segd.mesh.choice import Path as WgPath
from segd.mesh.plan import Desired
from segd.mesh.uapi import Device, Peer, UapiError

SOCKET_DIR = Path("/var/run/wireguard")
_TIMEOUT = 10.0


class MeshError(Exception):
    """A mesh kernel step failed; the message says which and why."""


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MeshError(f"{argv[0]}: {e}") from None
    if check and proc.returncode != 0:
        raise MeshError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def kernel_has_wireguard() -> bool:
    """Whether `ip link add … type wireguard` works here (tried on a probe link)."""
    probe = "segd-wgprobe"
    if _run(["ip", "link", "add", probe, "type", "wireguard"], check=False).returncode != 0:
        return False
    _run(["ip", "link", "del", probe], check=False)
    return True


def wireguard_go() -> str | None:
    return shutil.which("wireguard-go")


def link_exists(ifname: str) -> bool:
    return _run(["ip", "link", "show", "dev", ifname], check=False).returncode == 0


class WireGuardLink:
    """One WireGuard interface, kernel or userspace."""

    def __init__(self, ifname: str, path: WgPath, socket_dir: Path = SOCKET_DIR) -> None:
        self.ifname = ifname
        self.path = path
        self.socket = socket_dir / f"{ifname}.sock"

    # ---- the interface -------------------------------------------------------------

    def ensure(self) -> bool:
        """Make the interface (adopting a running one) and set it up; True when made."""
        made = False
        if self.path == "userspace":
            if not self._answers():
                if link_exists(self.ifname):  # a TUN whose wireguard-go is gone
                    _run(["ip", "link", "del", self.ifname], check=False)
                self._start_wireguard_go()
                made = True
        elif not link_exists(self.ifname):
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                ipr.link("add", ifname=self.ifname, kind="wireguard")
            made = True
        _run(["ip", "link", "set", "dev", self.ifname, "up"])
        return made

    def _start_wireguard_go(self) -> None:
        exe = wireguard_go()
        if exe is None:
            raise MeshError("wireguard-go is not installed")
        # It daemonizes (the parent returns once the device is up) and outlives us.
        try:
            proc = subprocess.run(
                [exe, self.ifname],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=_TIMEOUT,
                start_new_session=True,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise MeshError(f"wireguard-go: {e}") from None
        if proc.returncode != 0 or not self._answers():
            raise MeshError(f"wireguard-go {self.ifname}: {proc.stderr.strip()[-300:]}")

    def remove(self) -> None:
        """Delete the interface (wireguard-go exits when its TUN goes)."""
        _run(["ip", "link", "del", self.ifname], check=False)

    # ---- configuration ----------------------------------------------------------------

    def configure(self, private_key: bytes, listen_port: int, peers: list[Peer]) -> None:
        """Key, port and exactly these peers (what differs from the device only)."""
        if self.path == "userspace":
            have = self.device()
            if have is None:
                req: bytes | None = uapi.set_request(private_key, listen_port, peers)
            else:  # peers that stay keep their sessions
                req = uapi.update_request(have, private_key, listen_port, peers)
            if req is not None:
                uapi.check_errno(self._uapi(req))
            return
        self._configure_kernel(private_key, listen_port, peers)

    def device(self) -> Device | None:
        """What the interface holds now; None when it is not there."""
        if self.path == "userspace":
            if not self.socket.exists():
                return None
            try:
                return uapi.parse_get(self._uapi(uapi.GET_REQUEST))
            except (MeshError, UapiError):
                return None
        return self._kernel_device()

    def _answers(self) -> bool:
        try:
            uapi.parse_get(self._uapi(uapi.GET_REQUEST))
        except (MeshError, UapiError):
            return False
        return True

    def _uapi(self, request: bytes) -> bytes:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(_TIMEOUT)
                s.connect(str(self.socket))
                s.sendall(request)
                buf = b""
                while not uapi.complete(buf):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as e:
            raise MeshError(f"{self.socket}: {e.strerror or e}") from None
        return buf

    # ---- kernel WireGuard (pyroute2) ----------------------------------------------------

    def _configure_kernel(self, private_key: bytes, listen_port: int, peers: list[Peer]) -> None:
        from pyroute2 import WireGuard

        b64 = base64.b64encode
        want = {p.public_key: p for p in peers}
        have = self._kernel_device()
        with WireGuard() as wg:
            wg.set(self.ifname, private_key=b64(private_key).decode(), listen_port=listen_port)
            for old in have.peers if have is not None else ():
                if old.public_key not in want:
                    wg.set(
                        self.ifname,
                        peer={"public_key": b64(old.public_key).decode(), "remove": True},
                    )
            for p in peers:
                host, _, port = p.endpoint.rpartition(":")
                wg.set(
                    self.ifname,
                    peer={
                        "public_key": b64(p.public_key).decode(),
                        "endpoint_addr": host.strip("[]"),
                        "endpoint_port": int(port),
                        "persistent_keepalive": p.keepalive_s,
                        "replace_allowed_ips": True,
                        "allowed_ips": list(p.allowed_ips),
                    },
                )

    def _kernel_device(self) -> Device | None:
        from pyroute2 import WireGuard

        if not link_exists(self.ifname):
            return None
        with WireGuard() as wg:
            msg = wg.info(self.ifname)[0]
        private = base64.b64decode(msg.get_attr("WGDEVICE_A_PRIVATE_KEY") or b"")
        port = int(msg.get_attr("WGDEVICE_A_LISTEN_PORT") or 0)
        peers = []
        for p in msg.get_attr("WGDEVICE_A_PEERS") or []:
            key = base64.b64decode(p.get_attr("WGPEER_A_PUBLIC_KEY"))
            peers.append(Peer(key, "", ()))
        return Device(private, port, tuple(sorted(peers)))


# ---- routes --------------------------------------------------------------------------


# The routing protocol segd's `unreachable` pool routes are tagged with (any number
# the kernel does not interpret, above RTPROT_STATIC), so the route of a pool the
# server no longer uses is found and removed, and nobody else's is touched.
POOL_ROUTE_PROTO = "213"


def apply_routes(d: Desired) -> None:
    """A route to each peer subnet through the interface (source: the bridge's
    address), none to any other, and `unreachable` for the whole pool (and for
    no pool segd used before)."""
    wg, gw = d.local.ifname, d.local.gateway
    _run(["ip", "route", "replace", "unreachable", d.pool, "proto", POOL_ROUTE_PROTO])
    for pool in set(pool_routes()) - {d.pool}:
        remove_pool_route(pool)
    for subnet in d.routes:
        _run(["ip", "route", "replace", subnet, "dev", wg, "src", gw])
    for subnet in set(routes_on(wg)) - set(d.routes):
        _run(["ip", "route", "del", subnet, "dev", wg], check=False)


def routes_on(ifname: str) -> list[str]:
    out = _run(["ip", "-j", "-4", "route", "show", "dev", ifname], check=False).stdout
    try:
        rows = json.loads(out or "[]")
    except ValueError:
        return []
    return [str(r["dst"]) for r in rows if isinstance(r, dict) and "dst" in r]


def pool_routes() -> list[str]:
    """The pools segd's tagged `unreachable` routes cover."""
    argv = ["ip", "-j", "-4", "route", "show", "type", "unreachable", "proto", POOL_ROUTE_PROTO]
    try:
        rows = json.loads(_run(argv, check=False).stdout or "[]")
    except ValueError:
        return []
    return [str(r["dst"]) for r in rows if isinstance(r, dict) and "dst" in r]


def remove_pool_route(pool: str) -> None:
    """The pool's `unreachable` route (tagged or, from an earlier segd, not)."""
    _run(["ip", "route", "del", "unreachable", pool], check=False)


# ---- Docker's DOCKER-USER chain ------------------------------------------------------


def docker_user(keep: list[list[str]]) -> None:
    """Make segd's rules in `DOCKER-USER` exactly `keep` (first in the chain)."""
    from segd.mesh.plan import stale_docker_user_rules

    if shutil.which("iptables") is None:
        raise MeshError("iptables not found (Docker's DOCKER-USER chain is needed)")
    listing = _run(["iptables", "-w", "-S", "DOCKER-USER"], check=False)
    if listing.returncode != 0:
        if not keep:
            return
        raise MeshError(f"no DOCKER-USER chain (is Docker running?): {listing.stderr.strip()}")
    for spec in stale_docker_user_rules(listing.stdout, keep):
        _run(["iptables", "-w", "-D", "DOCKER-USER", *spec], check=False)
    for spec in keep:
        if _run(["iptables", "-w", "-C", "DOCKER-USER", *spec], check=False).returncode != 0:
            _run(["iptables", "-w", "-I", "DOCKER-USER", "1", *spec])
