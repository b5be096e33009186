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

    def spawn(self, *argv: str, stdin: bool = False) -> subprocess.Popen[str]:
        """Start a process in the namespace (with a pipe to its stdin if asked);
        it is killed when the test ends."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv],
            stdin=subprocess.PIPE if stdin else None,
            stdout=subprocess.PIPE,
            text=True,
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
            line = next(x for x in text.splitlines() if f"udp dport {port} " in x)
            return int(line.split("counter packets ")[1].split()[0])

        return count

    def mac(self, dev: str) -> str:
        link: list[dict[str, str]] = json.loads(self.ip("-j", "link", "show", dev))
        return link[0]["address"]

    def pin_neighbour(self, addr: str, mac: str, dev: str) -> None:
        """Resolve `addr` to `mac` on `dev` for good (no ARP / neighbour discovery)."""
        self.ip("neigh", "replace", addr, "lladdr", mac, "dev", dev, "nud", "permanent")

    def link_names(self) -> list[str]:
        links: list[dict[str, str]] = json.loads(self.ip("-j", "link", "show"))
        return [link["ifname"] for link in links]

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
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
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


def _veth(port: str, host: Netns, peer: Netns, peer_name: str = "eth0") -> None:
    """A veth pair: `port` in `host`, `peer_name` in `peer`."""
    _run(
        [
            "ip",
            "link",
            "add",
            port,
            "netns",
            host.name,
            "type",
            "veth",
            "peer",
            "name",
            peer_name,
            "netns",
            peer.name,
        ]
    )


def _add_addrs(ns: Netns, dev: str, addrs: Sequence[str]) -> None:
    """Put each address on `dev`: IPv4 as a /24, IPv6 as a /64 without DAD."""
    for addr in addrs:
        if ":" in addr:
            ns.ip("addr", "add", f"{addr}/64", "dev", dev, "nodad")
        else:
            ns.ip("addr", "add", f"{addr}/24", "dev", dev)


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
    _veth("eth0", a, b)
    p = Pair(a, b)
    for ns, addrs in ((a, (p.a4, p.a4_other, p.a6, p.a6_other)), (b, (p.b4, p.b6))):
        _add_addrs(ns, "eth0", addrs)
        ns.ip("link", "set", "eth0", "up")
    a.wait_ipv6("eth0")
    b.wait_ipv6("eth0")
    return p


@dataclass(frozen=True)
class BridgeLab:
    """A Docker-like bridge in `gw` with containers `c1`, `c2` on the ports `veth1`,
    `veth2`, and `out`, a network routed via `gw` that is not on the bridge."""

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
    c1_port: str = "veth1"
    c2_port: str = "veth2"

    def forget_neighbours(self, *more: Netns) -> None:
        """Drop learned (not pinned) neighbours everywhere, `more` namespaces' eth0 too.

        After traffic was dropped, lookups stay pending for seconds and retry
        only once a second: a probe right after the gate opens may time out.
        """
        ends = [(self.c1, "eth0"), (self.c2, "eth0"), (self.gw, self.bridge), (self.gw, "up0")]
        ends += [(self.out, "dn0"), *((ns, "eth0") for ns in more)]
        for ns, dev in ends:
            _run(["ip", "-n", ns.name, "neigh", "flush", "dev", dev], check=False)

    @property
    def entries(self) -> list[tuple[str, str]]:
        """The gate entries that admit c1 and c2 on their own ports."""
        return [
            (self.c1_port, self.c1_4),
            (self.c1_port, self.c1_6),
            (self.c2_port, self.c2_4),
            (self.c2_port, self.c2_6),
        ]


def attach(lab: BridgeLab, c: Netns, port: str, addrs: Sequence[str] = ()) -> None:
    """Put `c` on the lab's bridge like a container: its `eth0` behind the port `port`.

    With an address of a family, `c` also gets a default route via the bridge for it.
    """
    _veth(port, lab.gw, c)
    lab.gw.ip("link", "set", port, "master", lab.bridge, "up")
    _add_addrs(c, "eth0", addrs)
    c.ip("link", "set", "eth0", "up")
    if any(":" not in a for a in addrs):
        c.ip("route", "add", "default", "via", lab.gw4)
    if any(":" in a for a in addrs):
        c.ip("-6", "route", "add", "default", "via", lab.gw6)
    c.wait_ipv6("eth0")


@pytest.fixture
def bridge_lab(make_netns: MakeNetns) -> BridgeLab:
    gw, c1, c2, out = (make_netns(r) for r in ("gw", "c1", "c2", "out"))
    lab = BridgeLab(gw, c1, c2, out)
    gw.ip("link", "add", lab.bridge, "type", "bridge")
    _add_addrs(gw, lab.bridge, (lab.gw4, lab.gw6))
    gw.ip("link", "set", lab.bridge, "up")
    attach(lab, c1, lab.c1_port, (lab.c1_4, lab.c1_6))
    attach(lab, c2, lab.c2_port, (lab.c2_4, lab.c2_6))
    _veth("up0", gw, out, "dn0")
    _add_addrs(gw, "up0", ("10.213.2.1", "fd10:213:2::1"))
    gw.ip("link", "set", "up0", "up")
    _add_addrs(out, "dn0", (lab.out4, lab.out6))
    out.ip("link", "set", "dn0", "up")
    out.ip("route", "add", "default", "via", "10.213.2.1")
    out.ip("-6", "route", "add", "default", "via", "fd10:213:2::1")
    gw.sysctl("net.ipv4.ip_forward", "1")
    gw.sysctl("net.ipv6.conf.all.forwarding", "1")
    for ns, dev in ((gw, lab.bridge), (gw, "up0"), (out, "dn0")):
        ns.wait_ipv6(dev)
    return lab
