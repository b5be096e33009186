"""Throwaway network namespaces for kernel tests (root only).

Every namespace a test gets is uniquely named, wired only to other namespaces
the same test created (addresses in 10.213.0.0/16 and fd10:213::/32, which
exist nowhere else), and deleted afterwards with the processes started in it.
Probes are real sockets run inside a namespace with `ip netns exec`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import pytest

PROBE_TIMEOUT = 1.0

_SERVE = r"""
import socket, sys, threading
def tcp_loop(s):
    while True:
        c, _ = s.accept()
        try:
            c.sendall(b"ok")
        finally:
            c.close()
def udp_loop(s):
    while True:
        _, peer = s.recvfrom(64)
        s.sendto(b"ok", peer)
for kind, ports in (("tcp", sys.argv[1]), ("udp", sys.argv[2])):
    for port in [int(p) for p in ports.split(",") if p]:
        st = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
        s = socket.socket(socket.AF_INET6, st)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))
        if kind == "tcp":
            s.listen(128)
        loop = tcp_loop if kind == "tcp" else udp_loop
        threading.Thread(target=loop, args=(s,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

_PROBE = r"""
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
def one(p):
    host, port, proto, src, timeout = p
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    st = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(fam, st)
    s.settimeout(timeout)
    try:
        if src:
            s.bind((src, 0))
        if proto == "tcp":
            s.connect((host, port))
        else:
            s.connect((host, port))
            s.send(b"hi")
        return "ok" if s.recv(16) == b"ok" else "bad"
    except socket.timeout:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return "error: " + str(e.strerror)
    finally:
        s.close()
probes = json.loads(sys.argv[1])
with ThreadPoolExecutor(max(1, len(probes))) as ex:
    print(json.dumps(list(ex.map(one, probes))))
"""


_FLOOD = r"""
import socket, sys, time
host, port, seconds, src = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
if src:
    s.bind((src, 0))
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end:
    try:
        s.sendto(b"x", (host, port))
        n += 1
    except OSError:
        pass
print(n, flush=True)
"""


class Probe(NamedTuple):
    """One connection attempt: answered "ok", or "timeout" when dropped."""

    host: str
    port: int
    proto: str = "tcp"
    src: str | None = None


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


@dataclass
class Netns:
    name: str
    _procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> str:
        return _run(["ip", "netns", "exec", self.name, *argv], check=check, timeout=timeout)

    def ip(self, *argv: str) -> str:
        return _run(["ip", "-n", self.name, *argv])

    def nft(self, *argv: str, check: bool = True) -> str:
        return self.run("nft", *argv, check=check)

    def sysctl(self, key: str, value: str) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def spawn(self, *argv: str) -> subprocess.Popen[str]:
        """Start a process in the namespace; it is killed when the test ends."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv], stdout=subprocess.PIPE, text=True
        )
        self._procs.append(proc)
        return proc

    def flood_udp(
        self, host: str, port: int, seconds: float, src: str | None = None
    ) -> subprocess.Popen[str]:
        """Send UDP datagrams as fast as possible; prints how many when done."""
        return self.spawn(sys.executable, "-c", _FLOOD, host, str(port), str(seconds), src or "")

    def count_input(self, port: int) -> Callable[[], int]:
        """Count UDP datagrams to `port` that got past every filter at input priority 0."""
        self.nft(
            "add table inet probe; add chain inet probe after { type filter hook input"
            f" priority 10; }}; add rule inet probe after udp dport {port} counter"
        )

        def count() -> int:
            text = self.nft("list", "chain", "inet", "probe", "after")
            return int(text.split("counter packets ")[1].split()[0])

        return count

    def serve(self, tcp: Sequence[int] = (), udp: Sequence[int] = ()) -> None:
        """Answer "ok" on these ports (both families) until the test ends."""
        proc = self.spawn(
            sys.executable, "-c", _SERVE, ",".join(map(str, tcp)), ",".join(map(str, udp))
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"server in {self.name} did not start")

    def probe(self, probes: Sequence[Probe], timeout: float = PROBE_TIMEOUT) -> list[str]:
        """Run the probes from this namespace in parallel; one result each."""
        args = json.dumps([[p.host, p.port, p.proto, p.src, timeout] for p in probes])
        out = self.run(sys.executable, "-c", _PROBE, args, timeout=timeout + 30)
        result: list[str] = json.loads(out)
        return result

    def ping(self, addr: str, timeout: int = 1) -> bool:
        cmd = "ping6" if ":" in addr else "ping"
        argv = ["busybox", cmd, "-c", "1", "-W", str(timeout), addr]
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv], capture_output=True, timeout=30, check=False
        )
        return proc.returncode == 0

    def delete(self) -> None:
        self.stop()
        _run(["ip", "netns", "del", self.name], check=False)

    def recreate(self) -> None:
        """Delete the namespace and add a new, empty one under the same name."""
        self.delete()
        _run(["ip", "netns", "add", self.name])

    def wait_ipv6(self, dev: str, timeout: float = 5.0) -> None:
        """Wait until IPv6 on `dev` can receive neighbour discovery.

        For some tens of milliseconds after link-up a device has no `ff00::/8`
        route yet; a neighbour solicitation arriving then is dropped
        (Ip6InNoRoutes) and the sender retries only after a second.
        """
        deadline = time.monotonic() + timeout
        while f"ff00::/8 dev {dev} " not in self.ip("-6", "route", "show", "table", "local"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"IPv6 on {self.name}/{dev} not ready")
            time.sleep(0.01)

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs.clear()


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("kernel tests need root (network namespaces, nftables)")
    for tool in ("ip", "nft", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"kernel tests need {tool}")


MakeNetns = Callable[[str], Netns]


@pytest.fixture
def make_netns() -> Iterator[MakeNetns]:
    """A factory of fresh namespaces (loopback up), all deleted at teardown."""
    _require()
    tag = f"segdt{os.getpid() % 100000}{secrets.token_hex(2)}"
    made: list[Netns] = []

    def make(role: str) -> Netns:
        ns = Netns(f"{tag}-{role}")
        _run(["ip", "netns", "add", ns.name])
        made.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    try:
        yield make
    finally:
        for ns in made:
            ns.delete()


@dataclass(frozen=True)
class Pair:
    """Two namespaces on one veth link: `a` (.1, and .3 as a second source) and `b` (.2)."""

    a: Netns
    b: Netns
    a4: str = "10.213.0.1"
    a4_other: str = "10.213.0.3"
    b4: str = "10.213.0.2"
    a6: str = "fd10:213::1"
    a6_other: str = "fd10:213::3"
    b6: str = "fd10:213::2"


@pytest.fixture
def pair(make_netns: MakeNetns) -> Pair:
    a, b = make_netns("a"), make_netns("b")
    _run(
        [
            "ip",
            "link",
            "add",
            "eth0",
            "netns",
            a.name,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            b.name,
        ]
    )
    p = Pair(a, b)
    for ns, addrs in ((a, (p.a4, p.a4_other, p.a6, p.a6_other)), (b, (p.b4, p.b6))):
        for addr in addrs:
            plen = "64" if ":" in addr else "24"
            extra = ["nodad"] if ":" in addr else []
            ns.ip("addr", "add", f"{addr}/{plen}", "dev", "eth0", *extra)
        ns.ip("link", "set", "eth0", "up")
    a.wait_ipv6("eth0")
    b.wait_ipv6("eth0")
    return p


@dataclass(frozen=True)
class BridgeLab:
    """A Docker-like bridge in `gw` with containers `c1`, `c2` on `veth*` ports,
    and `out`, a network routed via `gw` that is not on the bridge."""

    gw: Netns
    c1: Netns
    c2: Netns
    out: Netns
    bridge: str = "segdtbr0"
    gw4: str = "10.213.1.1"
    c1_4: str = "10.213.1.11"
    c2_4: str = "10.213.1.12"
    out4: str = "10.213.2.2"
    gw6: str = "fd10:213:1::1"
    c1_6: str = "fd10:213:1::11"
    c2_6: str = "fd10:213:1::12"
    out6: str = "fd10:213:2::2"
    subnets: tuple[str, ...] = ("10.213.1.0/24", "fd10:213:1::/64")


@pytest.fixture
def bridge_lab(make_netns: MakeNetns) -> BridgeLab:
    gw, c1, c2, out = (make_netns(r) for r in ("gw", "c1", "c2", "out"))
    lab = BridgeLab(gw, c1, c2, out)
    gw.ip("link", "add", lab.bridge, "type", "bridge")
    gw.ip("addr", "add", f"{lab.gw4}/24", "dev", lab.bridge)
    gw.ip("addr", "add", f"{lab.gw6}/64", "dev", lab.bridge, "nodad")
    gw.ip("link", "set", lab.bridge, "up")
    for i, (c, a4, a6) in enumerate(((c1, lab.c1_4, lab.c1_6), (c2, lab.c2_4, lab.c2_6)), 1):
        port = f"veth{i}"
        _run(
            [
                "ip",
                "link",
                "add",
                port,
                "netns",
                gw.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                c.name,
            ]
        )
        gw.ip("link", "set", port, "master", lab.bridge, "up")
        c.ip("addr", "add", f"{a4}/24", "dev", "eth0")
        c.ip("addr", "add", f"{a6}/64", "dev", "eth0", "nodad")
        c.ip("link", "set", "eth0", "up")
        c.ip("route", "add", "default", "via", lab.gw4)
        c.ip("-6", "route", "add", "default", "via", lab.gw6)
    _run(
        [
            "ip",
            "link",
            "add",
            "up0",
            "netns",
            gw.name,
            "type",
            "veth",
            "peer",
            "name",
            "dn0",
            "netns",
            out.name,
        ]
    )
    gw.ip("addr", "add", "10.213.2.1/24", "dev", "up0")
    gw.ip("addr", "add", "fd10:213:2::1/64", "dev", "up0", "nodad")
    gw.ip("link", "set", "up0", "up")
    out.ip("addr", "add", f"{lab.out4}/24", "dev", "dn0")
    out.ip("addr", "add", f"{lab.out6}/64", "dev", "dn0", "nodad")
    out.ip("link", "set", "dn0", "up")
    out.ip("route", "add", "default", "via", "10.213.2.1")
    out.ip("-6", "route", "add", "default", "via", "fd10:213:2::1")
    gw.sysctl("net.ipv4.ip_forward", "1")
    gw.sysctl("net.ipv6.conf.all.forwarding", "1")
    for ns, dev in ((gw, lab.bridge), (gw, "up0"), (c1, "eth0"), (c2, "eth0"), (out, "dn0")):
        ns.wait_ipv6(dev)
    return lab
