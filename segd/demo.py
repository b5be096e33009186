"""`segd demo` (what `make demo` runs): a three-tier shop, segmented live.

It starts `segd allinone` on a fresh data dir, writes the policy (web -> api on
tcp/8080, api -> db on tcp/5432), issues pairing keys, registers container
profiles with the orchestrator and runs the tiers through it, adds an intruder
with no key and one with a forged key, then measures every pair with real TCP
connections and prints the matrix next to the policy. It waits for Ctrl-C (or
exits at once with --no-wait) and removes everything it started.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from segd import wire
from segd.firewall.gate import render_gate_removal
from segd.firewall.kernel import Firewall, NetnsError, NftError, unavailable
from segd.http.client import Client, ClientError
from segd.orchestrator import wire as owire

T = TypeVar("T")
IMAGE = "segd-busybox:latest"
DOCKER = "/usr/bin/docker" if os.path.exists("/usr/bin/docker") else "docker"
SERVE = (
    "httpd -p 80 -h /www && httpd -p 8080 -h /www && httpd -p 5432 -h /www && exec sleep 1000000"
)
TIERS = {  # name -> (labels, the port it serves)
    "web": ({"role": "web", "app": "shop", "env": "demo"}, 80),
    "api": ({"role": "api", "app": "shop", "env": "demo"}, 8080),
    "db": ({"role": "db", "app": "shop", "env": "demo"}, 5432),
}
RULES = [  # consumer, provider, service
    ("web", "api", "tcp/8080"),
    ("api", "db", "tcp/5432"),
]
PORT_OF = {**{n: p for n, (_, p) in TIERS.items()}, "intruder": 80, "forged": 80}


def _say(text: str = "") -> None:
    print(text, flush=True)


def _docker(*args: str, check: bool = True) -> str:
    p = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise RuntimeError(f"docker {args[0]}: {p.stderr.strip()}")
    return p.stdout.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = pred()
        except ClientError:
            v = None
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def _preflight() -> str:
    problem = unavailable()
    if problem is not None:
        return f"{problem}; run `make demo` (as root: it installs nftables and Docker)"
    try:
        _docker("info")
        _docker("image", "inspect", IMAGE)
    except (RuntimeError, OSError) as e:
        return f"{e}; run `make demo`, which installs Docker and builds the image"
    return ""


class Demo:
    def __init__(self, data_dir: str) -> None:
        self.own_dir = not data_dir
        self.dir = Path(data_dir or tempfile.mkdtemp(prefix="segd-demo-"))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.api: Client | None = None
        self.containers: dict[str, str] = {}
        self.orch_ids: list[str] = []

    def call(self, t: type[T], method: str, path: str, body: object = None) -> T:
        """One request to the all-in-one listener (both APIs), its answer as `t`."""
        assert self.api is not None
        return self.api.get(t, method, path, body)

    def post(self, method: str, path: str, body: object = None) -> None:
        assert self.api is not None
        self.api.call(method, path, body)

    # ---- steps -----------------------------------------------------------------------

    def start(self) -> None:
        log = open(self.dir / "allinone.log", "ab")  # noqa: SIM115 - child keeps it
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "segd",
                "allinone",
                "--data-dir",
                str(self.dir),
                "--listen",
                f"127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        token_file = self.dir / "server" / "admin.token"
        _wait(lambda: token_file.exists() and self._alive(), 30, "segd allinone to start")
        self.api = Client(self.url, token_file.read_text().strip(), timeout=10)
        _wait(lambda: self.call(list[wire.Host], "GET", "/v1/hosts"), 30, "the agent to register")

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = (self.dir / "allinone.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"segd allinone exited:\n{tail}")
        return True

    def policy(self) -> dict[str, str]:
        assert self.api is not None
        return write_policy(self.api)

    def run_tiers(self, keys: dict[str, str]) -> None:
        for name, (labels, _) in TIERS.items():
            profile = owire.ProfileIn(
                name=f"shop-{name}",
                image=IMAGE,
                command=["sh", "-c", SERVE],
                labels=labels,
                pairing_key=keys[name],
            )
            self.post("POST", "/v1/orch/profiles", profile)
            run = owire.RunIn(profile=f"shop-{name}")
            cid = self.call(list[owire.Container], "POST", "/v1/orch/run", run)[0].id
            self.orch_ids.append(cid)
            self.containers[name] = cid

    def run_intruders(self, keys: dict[str, str]) -> None:
        token = keys["db"]
        forged = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
        for name, extra in (
            ("intruder", []),
            ("forged", ["--label", f"segd.pairing-key={forged}", "--label", "segd.label.role=db"]),
        ):
            cid = _docker(
                "run",
                "-d",
                "--label",
                "segd.demo=1",
                "--name",
                f"segd-demo-{name}-{self.port}",
                *extra,
                IMAGE,
                "sh",
                "-c",
                SERVE,
            )
            self.containers[name] = cid

    def wait_enforced(self) -> None:
        want = {self.containers[n] for n in TIERS}

        def paired() -> bool:
            got = {w.container_id for w in self.call(list[wire.Workload], "GET", "/v1/workloads")}
            return want <= got

        _wait(paired, 30, "the three tiers to pair")

        def denied() -> bool:
            rows = self.call(list[wire.AuditEntry], "GET", "/v1/audit?limit=500")
            return any(
                r.container_id == self.containers["forged"] and r.result != "ok" for r in rows
            )

        _wait(denied, 30, "the forged key to be refused")
        ips = self.ips()

        def allowed_connect() -> bool:
            # The instructions have reached every peer's namespace once each
            # allowed pair connects (the denied ones are denied from the start).
            got = self.measure(ips, [(c, p) for c, p, _ in RULES])
            return all(got.values())

        _wait(allowed_connect, 30, "the instructions to reach every peer")

    def ips(self) -> dict[str, str]:
        return {
            n: _docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", c)
            for n, c in self.containers.items()
        }

    def measure(
        self, ips: dict[str, str], pairs: list[tuple[str, str]] | None = None
    ) -> dict[tuple[str, str], bool]:
        """Whether each (source, destination) connects: `pairs`, or every pair."""

        def probe(src: str) -> dict[tuple[str, str], bool]:
            dsts = [d for d in self.containers if d != src and (pairs is None or (src, d) in pairs)]
            if not dsts:
                return {}
            script = (
                " ".join(
                    f"(nc -w 1 {ips[d]} {PORT_OF[d]} </dev/null >/dev/null 2>&1 && echo 'ok {d}' "
                    f"|| echo 'no {d}') &"
                    for d in dsts
                )
                + " wait"
            )
            out = _docker("exec", self.containers[src], "sh", "-c", script)
            res = {}
            for line in out.splitlines():
                verdict, dst = line.split()
                res[(src, dst)] = verdict == "ok"
            return res

        out: dict[tuple[str, str], bool] = {}
        with ThreadPoolExecutor(len(self.containers)) as pool:
            for part in pool.map(probe, self.containers):
                out.update(part)
        return out

    def cleanup(self) -> None:
        for cid in self.containers.values():
            _docker("rm", "-f", cid, check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # The host gate outlives the agent by design; the demo started it, so it goes.
        try:
            asyncio.run(_remove_gate())
        except (NftError, NetnsError, OSError) as e:
            print(f"segd demo: could not remove the host gate: {e}", file=sys.stderr)
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def write_policy(api: Client, max_uses: int = 3) -> dict[str, str]:
    """The shop's rules and one profile per tier; a pairing key per tier."""
    for consumer, provider, service in RULES:
        rule = wire.RuleIn(
            providers=[{"role": provider, "app": "shop"}],
            consumers=[{"role": consumer, "app": "shop"}],
            services=[service],
            description=f"{consumer} uses {provider}",
        )
        api.call("POST", "/v1/rules", rule)
    keys = {}
    for name, (labels, _) in TIERS.items():
        profile = wire.ProfileIn(
            name=f"shop-{name}",
            labels=labels,
            locked=["role", "app"],
            max_uses=max_uses,
            lifespan_s=3600,
            description=f"demo {name} tier",
        )
        api.call("POST", "/v1/profiles", profile)
        key = wire.KeyIssueIn(profile=f"shop-{name}")
        keys[name] = api.get(wire.KeyIssued, "POST", "/v1/keys", key).token
    return keys


def say_policy() -> None:
    _say("  policy:")
    for consumer, provider, service in RULES:
        _say(f"    role={consumer},app=shop  ->  role={provider},app=shop  on {service}")


async def _remove_gate() -> None:
    async with Firewall() as fw:
        await fw.gate_apply(render_gate_removal())


def expected(src: str, dst: str) -> bool:
    return any(src == c and dst == p for c, p, _ in RULES)


def render_matrix(got: dict[tuple[str, str], bool], names: list[str]) -> tuple[str, int]:
    cols = [f"{d}:{PORT_OF[d]}" for d in names]
    width = max(len(c) for c in cols) + 2
    lines = ["  from \\ to  " + "".join(c.rjust(width) for c in cols)]
    wrong = 0
    for src in names:
        cells = []
        for dst in names:
            if src == dst:
                cells.append("-".rjust(width))
                continue
            ok, want = got[(src, dst)], expected(src, dst)
            mark = ("ALLOW" if ok else "deny") + ("" if ok == want else "!")
            wrong += ok != want
            cells.append(mark.rjust(width))
        lines.append(f"  {src:<11}" + "".join(cells))
    return "\n".join(lines), wrong


def say_matrix(got: dict[tuple[str, str], bool], names: list[str], how: str, took: float) -> int:
    """Print the live matrix and whether it matches the policy; the mismatches."""
    table, wrong = render_matrix(got, names)
    _say(
        f"\n  live matrix: real TCP connects from each container to each other's "
        f"service port{how} ({took:.1f}s)"
    )
    _say(table)
    total = len(got)
    if wrong:
        _say(f"\n  result: MISMATCH in {wrong} of {total} pairs ('!' marks them)")
    else:
        _say(
            f"\n  result: the matrix matches the policy ({total}/{total} pairs; "
            f"{sum(got.values())} allowed, the rest dropped)"
        )
    return wrong


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


_STOP = {signal.SIGINT, signal.SIGTERM}


def wait_for_ctrl_c(*lines: str) -> None:
    """Say `lines`, then wait for Ctrl-C or SIGTERM.

    The two signals are blocked before the lines are said, so one sent the moment
    they are read is waited for rather than raised between the print and the wait;
    a blocked signal is also kept when the demo was started with SIGINT ignored.
    Afterwards both are ignored: a second Ctrl-C does not cut the cleanup short.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP)
    try:
        for line in lines:
            _say(line)
        signal.sigwait(_STOP)
    finally:
        for sig in _STOP:
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP)


def demo_main(*, data_dir: str = "", wait: bool = True) -> int:
    problem = _preflight()
    if problem:
        print(f"segd demo: {problem}", file=sys.stderr)
        return 1
    demo = Demo(data_dir)
    try:
        _say("segd demo: pairing keys -> labels -> nftables in every container\n")
        demo.start()
        _say(f"  segd allinone is up at {demo.url} (data in {demo.dir})")
        keys = demo.policy()
        say_policy()
        _say("  pairing keys issued for profiles shop-web, shop-api, shop-db (role and app locked)")
        demo.run_tiers(keys)
        _say("  orchestrator started web, api and db with their keys as Docker labels")
        demo.run_intruders(keys)
        _say("  started 'intruder' (no key) and 'forged' (a db key with a forged signature)")
        demo.wait_enforced()
        ips = demo.ips()
        workloads = {
            w.container_id: w for w in demo.call(list[wire.Workload], "GET", "/v1/workloads")
        }
        denials = {
            e.container_id: e.reason
            for e in demo.call(list[wire.AuditEntry], "GET", "/v1/audit?limit=500")
            if e.result == "denied" and e.container_id
        }
        _say("\n  containers:")
        for name, cid in demo.containers.items():
            w = workloads.get(cid)
            if w is not None:
                state = "paired  " + ",".join(f"{k}={v}" for k, v in w.labels.items())
            elif cid in denials:
                state = f"isolated: pairing refused ({denials[cid]})"
            else:
                state = "isolated: no pairing key"
            _say(f"    {name:<9} {ips[name]:<15} {state}")
        names = list(demo.containers)
        t0 = time.monotonic()
        got = demo.measure(ips)
        wrong = say_matrix(got, names, "", time.monotonic() - t0)
        _say(
            "\n  the same shop over three simulated hosts, through a WireGuard mesh: "
            "segd demo --hosts 3 (make demo HOSTS=3)"
        )
        if wait and not wrong:
            wait_for_ctrl_c(
                f"\n  try: segd ctl --server {demo.url} --token-file "
                f"{demo.dir}/server/admin.token workload list",
                "  press Ctrl-C to stop and clean up",
            )
        return 1 if wrong else 0
    except (RuntimeError, ClientError) as e:
        print(f"segd demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        _say(
            "\n  cleaning up: containers, segd allinone, host gate"
            + ("" if not demo.own_dir else ", data dir")
        )
        demo.cleanup()
