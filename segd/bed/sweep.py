"""Teardown: find everything a bed made (this one's, or a crashed run's) from the
machine's state alone, and remove it. Idempotent."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from segd.bed import plan
from segd.bed.plan import BRIDGE, DATA_DIR, PREFIX, RUN_DIR, is_bed_name, is_bed_process
from segd.bed.system import (
    ancestors,
    cgroup_dirs,
    cgroup_pids,
    descendants,
    inode,
    kill_and_wait,
    mounts,
    processes,
    remove_cgroup,
    run,
)

NETNS_DIR = Path("/run/netns")
LOCK_DIR = Path("/run/segd")  # agents' per-namespace locks (segd.agent.hostlock)
IPTABLES_TABLES = ("filter", "nat")


def bed_netns() -> dict[str, int | None]:
    """The bed's network namespaces: name -> nsfs inode (None: a dead mount point)."""
    try:
        names = sorted(n for n in os.listdir(NETNS_DIR) if is_bed_name(n))
    except OSError:
        return {}
    return {n: inode(NETNS_DIR / n) for n in names}


def bed_links() -> list[str]:
    """The bed's links in the root namespace, the bridge last."""
    out = run(["ip", "-j", "link", "show"], check=False).stdout
    try:
        names = [str(link["ifname"]) for link in json.loads(out or "[]")]
    except (ValueError, KeyError, TypeError):
        return []
    bed = sorted(n for n in names if is_bed_name(n))
    return sorted(bed, key=lambda n: n == BRIDGE)


def bed_processes(nets: set[int]) -> dict[int, tuple[str, ...]]:
    """Every process of the bed: in its namespaces (network or a holder's mount
    namespace), in its cgroups, an engine program working in its run directory, and
    everything they started; never this process or its ancestors."""
    procs = processes()
    holders = {p.pid for p in procs if p.argv and plan.HOLDER_RE.match(p.argv[0])}
    mnts = {p.mnt for p in procs if p.pid in holders and p.mnt is not None}
    roots = {
        p.pid
        for p in procs
        if p.net in nets or p.mnt in mnts or p.pid in holders or is_bed_process(p.argv)
    }
    for top in cgroup_dirs(PREFIX):
        roots |= cgroup_pids(top)
    alive = {p.pid: p for p in procs if not p.zombie}
    mine = ancestors(procs, os.getpid())
    return {
        pid: alive[pid].argv for pid in sorted(descendants(procs, roots) - mine) if pid in alive
    }


def bed_mounts() -> list[str]:
    """Mount points of the bed in this mount namespace, deepest first."""
    roots = (str(RUN_DIR), str(DATA_DIR))
    points = [
        m.point
        for m in mounts()
        if any(m.point == r or m.point.startswith(r + "/") for r in roots)
        or (m.point.startswith(str(NETNS_DIR) + "/") and is_bed_name(Path(m.point).name))
    ]
    return sorted(set(points), key=len, reverse=True)


def bed_rules() -> list[list[str]]:
    if shutil.which("iptables") is None:
        return []
    out = []
    for table in IPTABLES_TABLES:
        listing = run(["iptables", "-w", "-t", table, "-S"], check=False).stdout
        out += plan.rule_deletions(table, listing)
    return out


def down() -> list[str]:
    """Remove every trace of a bed; what could not be removed (empty: clean)."""
    nets = bed_netns()
    live = {i for i in nets.values() if i is not None}
    kill_and_wait(bed_processes(live))
    for link in bed_links():
        run(["ip", "link", "del", link], check=False)
    for name in nets:
        run(["ip", "netns", "del", name], check=False)
    for rule in bed_rules():
        run(["iptables", "-w", *rule], check=False)
    for point in bed_mounts():
        run(["umount", "-l", point], check=False)
    for top in cgroup_dirs(PREFIX):
        remove_cgroup(top)
    for ino in live:  # agents' locks of the namespaces just deleted
        (LOCK_DIR / f"agent.{ino}.lock").unlink(missing_ok=True)
    for path in (RUN_DIR, DATA_DIR):
        _remove_tree(path)
    return leftovers()


def _remove_tree(path: Path, timeout: float = 5) -> None:
    """Mounts of a dead mount namespace are released moments after its last process."""
    deadline = time.monotonic() + timeout
    while path.exists():
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists() or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def leftovers() -> list[str]:
    """What of a bed is on this machine, one line each (empty: nothing)."""
    nets = bed_netns()
    live = {i for i in nets.values() if i is not None}
    out = [f"netns {n}" for n in nets]
    out += [f"link {n}" for n in bed_links()]
    out += [f"process {pid}: {' '.join(argv)}" for pid, argv in bed_processes(live).items()]
    out += [f"mount {m}" for m in bed_mounts()]
    out += [f"iptables {' '.join(r)}" for r in bed_rules()]
    out += [f"cgroup {d}" for d in cgroup_dirs(PREFIX)]
    out += [f"path {p}" for p in (RUN_DIR, DATA_DIR) if p.exists()]
    return out
