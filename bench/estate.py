"""A synthetic estate for the compile benchmark: apps in tiers, environments, locations.

Seeded, so every run compiles the same estate. Four label dimensions:

- `app`: business apps `app000`... with Zipf-like sizes (weight 1/(rank+1)^0.9),
  each with a call chain of 3-5 roles in a fixed tier order (web, api,
  worker, queue, cache, db), and three small platform apps: `dns` (role
  `dns`), `monitoring` (role `prom`), `backup` (role `agent`), about 3 % of
  the workloads together.
- `role`: uniform over the app's chain.
- `env`: prod 60 %, staging 25 %, dev 15 %.
- `loc`: four locations, 30/20/30/20 %. Hosts are spread evenly over the
  locations; a workload lands on a random host of its location.

Rules, generated in this order until there are `n_rules`:

- platform: DNS for everyone (`consumers any`, udp/53 and tcp/53); monitoring
  scrapes every prod workload (provider `{env=prod}`, tcp/9100); databases
  push backups to the backup agent of their location (4 rules);
- tier rules: per app and env, each consecutive pair of its chain
  (`{app, role=caller, env}` -> `{app, role=callee, env}` on the callee's port);
- ingress: the web tier of the 20 largest apps in prod from `any` on tcp/443;
- cross-app calls: random `{app=A, role=api|worker, env}` -> `{app=B, role=api, env}`
  on tcp/8080 until the count is reached.

Addresses come from 198.18.0.0/15 (the benchmarking range); nothing is ever sent to them.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator
from dataclasses import dataclass

from segd.policy import Labels, Selectors
from segd.wire import Rule, Workload

ROLE_ORDER = ("web", "api", "worker", "queue", "cache", "db")
PORTS = {
    "web": ["tcp/443", "tcp/80"],
    "api": ["tcp/8080"],
    "worker": ["tcp/9000"],
    "queue": ["tcp/5672"],
    "cache": ["tcp/6379"],
    "db": ["tcp/5432"],
}
ENVS = (("prod", 0.60), ("staging", 0.25), ("dev", 0.15))
LOCS = (("eu-1", 0.3), ("eu-2", 0.2), ("us-1", 0.3), ("us-2", 0.2))
PLATFORM = (("dns", "dns", 0.01), ("monitoring", "prom", 0.005), ("backup", "agent", 0.015))
FAKE_NET = ipaddress.IPv4Network("198.18.0.0/15")


def fake_ip(index: int) -> str:
    """A distinct address per index in 198.18.0.0/15 (131,070 of them)."""
    return str(FAKE_NET.network_address + 1 + index % (FAKE_NET.num_addresses - 2))


@dataclass(frozen=True)
class App:
    name: str
    chain: tuple[str, ...]  # roles in call order
    weight: float


@dataclass
class Estate:
    apps: list[App]
    hosts: list[str]
    hosts_by_loc: dict[str, list[str]]
    rules: list[Rule]
    workloads: list[Workload]
    rng: random.Random
    next_index: int = 0

    def new_workload(self) -> Workload:
        """One more workload drawn from the same distribution (for incremental updates)."""
        w = _workload(self, self.next_index)
        self.next_index += 1
        return w

    def label_stats(self) -> dict[str, int]:
        distinct = {d: len({w.labels[d] for w in self.workloads}) for d in ("role", "app")}
        return {
            "apps": len(self.apps),
            "distinct_roles": distinct["role"],
            "distinct_apps_used": distinct["app"],
            "largest_app_workloads": max(
                sum(1 for w in self.workloads if w.labels["app"] == a.name) for a in self.apps[:1]
            ),
        }


def _pick(rng: random.Random, weighted: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([k for k, _ in weighted], [w for _, w in weighted])[0]


def _apps(rng: random.Random, n_apps: int) -> list[App]:
    apps: list[App] = []
    for i in range(n_apps):
        k = rng.randint(3, 5)
        middle = rng.sample(ROLE_ORDER[1:-1], k - 2)
        chain = tuple(sorted({"web", *middle, "db"}, key=ROLE_ORDER.index))
        apps.append(App(f"app{i:03d}", chain, 1.0 / (i + 1) ** 0.9))
    total = sum(a.weight for a in apps)
    share = sum(s for _, _, s in PLATFORM)
    apps = [App(a.name, a.chain, a.weight / total * (1 - share)) for a in apps]
    apps += [App(name, (role,), s) for name, role, s in PLATFORM]
    return apps


def _workload(e: Estate, index: int) -> Workload:
    rng = e.rng
    app = rng.choices(e.apps, [a.weight for a in e.apps])[0]
    loc = _pick(rng, LOCS)
    labels: Labels = {
        "app": app.name,
        "env": "prod" if len(app.chain) == 1 else _pick(rng, ENVS),
        "loc": loc,
        "role": rng.choice(app.chain),
    }
    return Workload(
        id=f"w_{index:016x}",
        host_id=rng.choice(e.hosts_by_loc[loc]),
        container_id=f"c{index:011d}",
        name=f"{app.name}-{labels['role']}-{index}",
        labels=labels,
        ips=[fake_ip(index)],
        key_id="k_0000000000000000",
        paired_at=0.0,
    )


def _rules(rng: random.Random, apps: list[App], n_rules: int) -> list[Rule]:
    out: list[Rule] = []
    seen: set[str] = set()

    def add(providers: Selectors, consumers: Selectors, services: list[str]) -> None:
        key = repr((providers, consumers, services))
        if key in seen or len(out) >= n_rules:
            return
        seen.add(key)
        out.append(
            Rule(
                id=f"r_{len(out):08x}",
                providers=providers,
                consumers=consumers,
                services=services,
            )
        )

    add([{"app": "dns", "role": "dns"}], "any", ["udp/53", "tcp/53"])
    add([{"env": "prod"}], [{"app": "monitoring", "role": "prom"}], ["tcp/9100"])
    for loc, _ in LOCS:
        add([{"app": "backup", "loc": loc}], [{"role": "db", "loc": loc}], ["tcp/873"])
    business = [a for a in apps if len(a.chain) > 1]
    for a in business:
        for env, _ in ENVS:
            for caller, callee in zip(a.chain, a.chain[1:], strict=False):
                add(
                    [{"app": a.name, "env": env, "role": callee}],
                    [{"app": a.name, "env": env, "role": caller}],
                    PORTS[callee],
                )
    for a in business[:20]:
        add([{"app": a.name, "env": "prod", "role": "web"}], "any", ["tcp/443"])
    for _ in _bounded(50 * n_rules):
        if len(out) >= n_rules or len(business) < 2:
            break
        a, b = rng.sample(business, 2)
        env = _pick(rng, ENVS)
        role = rng.choice(("api", "worker"))
        add(
            [{"app": b.name, "env": env, "role": "api"}],
            [{"app": a.name, "env": env, "role": role}],
            ["tcp/8080"],
        )
    return out


def _bounded(n: int) -> Iterator[int]:
    return iter(range(n))


def build(
    n_workloads: int, n_hosts: int, n_rules: int, *, n_apps: int = 60, seed: int = 5
) -> Estate:
    rng = random.Random(seed)
    apps = _apps(rng, n_apps)
    hosts = [f"h_{i:016x}" for i in range(n_hosts)]
    by_loc: dict[str, list[str]] = {loc: [] for loc, _ in LOCS}
    for i, h in enumerate(hosts):
        by_loc[LOCS[i % len(LOCS)][0]].append(h)
    e = Estate(apps, hosts, by_loc, _rules(rng, apps, n_rules), [], rng)
    e.workloads = [e.new_workload() for _ in range(n_workloads)]
    return e
