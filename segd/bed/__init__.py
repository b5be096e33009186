"""A multi-host test bed on one machine: N simulated Docker hosts, for the tests,
the benchmark and the demo (root only).

Host i (1-based) is:

* a network namespace `segd-bed-hi` whose `eth0` is a veth to the underlay bridge
  `segd-bed` in the root namespace: 10.250.0.0/24, the root at 10.250.0.1 (a
  server listens there), host i at 10.250.0.(10+i), default route via the root;
* its own long-lived mount namespace, kept alive by a sleeping holder process
  (argv[0] `segd-bed-hi-mnt`). Everything on the host runs in both namespaces:
  its `dockerd` (so the engine's mounts, netns files included, are visible to the
  host's agents and never to the root namespace, and die with the host), its
  agents, and later anything that needs a private `/run` entry (wireguard-go's
  `/run/wireguard`). Mounts made in the root later propagate in (slave), none
  leave;
* its own `dockerd`: data-root `/var/lib/segd-bed/hi`, exec-root, socket
  (`unix:///run/segd-bed/hi/docker.sock`), pidfile and log under
  `/run/segd-bed/hi`, its own config file (not the machine's daemon.json), and
  its containers in the cgroup `/segd-bed-hi`. Docker's defaults otherwise: every
  host has `docker0` = 172.17.0.0/16, and its first container is 172.17.0.2, as on
  real fleets. It is started with `nsenter --net=… --mount=…`: `ip netns exec`
  remounts /sys and dockerd then fails ("Devices cgroup isn't mounted");
* the locally built image (`segd-busybox:latest`) loaded from the root engine
  (`docker save | docker load`).

The root engine sets the root FORWARD policy to DROP and bridge-nf-call-iptables
applies it to the underlay bridge, so the bed inserts one FORWARD accept for the
bridge, tagged with the comment `segd-bed`.

Teardown (`Bed.down`, `sweep.down`, `python -m segd.bed down`) finds everything
from the machine's state alone and removes it, also what a crashed run left:
processes (in a bed namespace, holders, engine programs working under
/run/segd-bed, the bed's cgroups, and their descendants) by SIGKILL, links,
namespaces, tagged iptables rules, mounts, cgroups, the agents' lock files and
both directories. `Bed.up` starts with it. One bed per machine.

API (see bed.py):

    bed = Bed.up(3)                      # or Bed.attach() to a bed up by the CLI
    h = bed.host(2)                      # BedHost; bed.hosts is the list
    h.docker("run", "-d", IMAGE, ...)    # the docker CLI against host 2's engine
    h.run("ip", "addr")                  # a command on host 2 (DOCKER_HOST set)
    h.popen([...]); h.argv([...])        # ... as a process; the wrapped argv
    h.ping("10.250.0.11"); h.probe(container, [(ip, port), ...])
    h.private_dir("/run/wireguard")      # a tmpfs only host 2 sees
    a = h.start_agent(bed.server_url(port), code)   # BedAgent: stop/kill/restart/logs
    bed.down()                           # -> leftovers (empty: clean)

By hand: `python -m segd.bed up --hosts 3`, `python -m segd.bed exec 2 -- docker
ps`, `python -m segd.bed status`, `python -m segd.bed down`.
"""

from __future__ import annotations

from segd.bed.agent import BedAgent
from segd.bed.bed import Bed, BedHost
from segd.bed.plan import IMAGE, ROOT_ADDRESS, UNDERLAY, HostPlan
from segd.bed.sweep import down, leftovers
from segd.bed.system import BedError

__all__ = [
    "IMAGE",
    "ROOT_ADDRESS",
    "UNDERLAY",
    "Bed",
    "BedAgent",
    "BedError",
    "BedHost",
    "HostPlan",
    "down",
    "leftovers",
]
