"""The applier on real namespaces and real nftables, proven with real packets.

`b` is the enforced "container"; `a` is a peer with two source addresses per
family, one of which is in the peer set and one not.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from segd.firewall import render
from segd.firewall.kernel import Firewall, HostNamespace, NamespaceGone, NftError, NsRef
from segd.firewall.plan import Plan
from segd.policy import Service
from segd.wire import Allow, WorkloadPolicy
from tests.kernel.conftest import MakeNetns, Pair, Probe

pytestmark = pytest.mark.kernel

BACKENDS = ["libnftables", "nsenter"]
PEERS = "ls_00000000000000aa"
OTHERS = "ls_00000000000000bb"


def tcp(port: int, end: int | None = None) -> Service:
    return Service("tcp", port, end or port)


def policy(inbound: list[Allow], outbound: list[Allow] | None = None) -> WorkloadPolicy:
    return WorkloadPolicy("w", "c", {}, [], inbound, outbound or [])


POLICY = policy(
    inbound=[
        Allow("db", PEERS, [tcp(5432)]),
        Allow("range", PEERS, [tcp(8000, 8100)]),
        Allow("dns", None, [Service("udp", 53, 53)]),
        Allow("ping", None, [Service("icmp")]),
    ],
    outbound=[Allow("out", PEERS, [tcp(9000)])],
)


def host_tables() -> str:
    """The host's table list (rules may change under a running Docker; tables do not)."""
    out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True)
    assert "table inet segd" not in out.stdout
    return out.stdout


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_ruleset_allows_exactly_what_it_should(backend: str, pair: Pair) -> None:
    a, b = pair.a, pair.b
    b.serve(tcp=[5432, 5433, 8050, 8101], udp=[53, 54])
    a.serve(tcp=[9000, 9001])
    host_before = host_tables()
    async with Firewall(backend) as fw:  # type: ignore[arg-type]
        sets = {PEERS: [pair.a4, pair.a6]}
        await fw.apply(NsRef("b", b.path), render.render_workload(POLICY, sets, frozenset({"db"})))

    inbound = {
        Probe(pair.b4, 5432, src=pair.a4): "ok",
        Probe(pair.b6, 5432, src=pair.a6): "ok",
        Probe(pair.b4, 5432, src=pair.a4_other): "timeout",  # not in the peer set
        Probe(pair.b6, 5432, src=pair.a6_other): "timeout",
        Probe(pair.b4, 5433, src=pair.a4): "timeout",  # service not allowed
        Probe(pair.b4, 8050, src=pair.a4): "ok",  # inside the port range
        Probe(pair.b6, 8101, src=pair.a6): "timeout",  # just outside it
        Probe(pair.b4, 53, "udp", src=pair.a4_other): "ok",  # any peer
        Probe(pair.b6, 53, "udp", src=pair.a6_other): "ok",
        Probe(pair.b4, 54, "udp", src=pair.a4): "timeout",
    }
    assert dict(zip(inbound, a.probe(list(inbound)), strict=True)) == inbound

    outbound = {
        Probe(pair.a4, 9000): "ok",
        Probe(pair.a6, 9000): "ok",
        Probe(pair.a4, 9001): "timeout",
        Probe(pair.a4_other, 9000): "timeout",  # not in the peer set
    }
    assert dict(zip(outbound, b.probe(list(outbound)), strict=True)) == outbound

    assert a.ping(pair.b4) and a.ping(pair.b6)  # icmp from any
    assert not b.ping(pair.a4)  # no outbound icmp allowed
    assert host_tables() == host_before


@pytest.mark.parametrize("backend", BACKENDS)
async def test_set_element_changes_reachability_without_rule_rewrite(
    backend: str, pair: Pair
) -> None:
    a, b = pair.a, pair.b
    b.serve(tcp=[5432])
    ns = NsRef("b", b.path)
    pol = policy([Allow("db", PEERS, [tcp(5432)])])
    probes = [Probe(pair.b4, 5432, src=pair.a4_other), Probe(pair.b6, 5432, src=pair.a6_other)]
    async with Firewall(backend) as fw:  # type: ignore[arg-type]
        old = {PEERS: [pair.a4]}
        await fw.apply(ns, render.render_workload(pol, old))
        rules_before = b.nft("-a", "list", "chain", "inet", "segd", "input")
        assert a.probe(probes) == ["timeout", "timeout"]

        new = {PEERS: [pair.a4, pair.a4_other, pair.a6_other]}
        delta = render.render_set_delta(old, new, {PEERS})
        assert delta is not None and "rule" not in delta.text
        await fw.apply(ns, delta)
        assert a.probe(probes) == ["ok", "ok"]

        delta = render.render_set_delta(new, old, {PEERS})
        assert delta is not None
        await fw.apply(ns, delta)
        assert a.probe(probes) == ["timeout", "timeout"]
        assert a.probe([Probe(pair.b4, 5432, src=pair.a4)]) == ["ok"]
        # Same rule handles: the chain was never rewritten.
        assert b.nft("-a", "list", "chain", "inet", "segd", "input") == rules_before


async def test_isolation_drops_everything_but_loopback(pair: Pair) -> None:
    a, b = pair.a, pair.b
    b.serve(tcp=[5432], udp=[53])
    async with Firewall() as fw:
        await fw.apply(NsRef("b", b.path), render.render_isolation())
    probes = [Probe(pair.b4, 5432), Probe(pair.b6, 5432), Probe(pair.b4, 53, "udp")]
    assert a.probe(probes) == ["timeout"] * 3
    assert not a.ping(pair.b4)
    assert not a.ping(pair.b6)
    assert not b.ping(pair.a4)
    local = [Probe("127.0.0.1", 5432), Probe("::1", 5432), Probe("127.0.0.1", 53, "udp")]
    assert b.probe(local) == ["ok"] * 3


async def test_applies_in_the_target_namespace_only(pair: Pair) -> None:
    host_before = host_tables()
    a_before = pair.a.nft("list", "ruleset")
    async with Firewall("libnftables") as fw:
        await fw.apply(NsRef("b", pair.b.path), render.render_isolation())
        assert await fw.list_table(NsRef("a", pair.a.path)) is None
    assert "table inet segd" in pair.b.nft("list", "tables")
    assert pair.a.nft("list", "ruleset") == a_before
    assert host_tables() == host_before


async def test_list_table_is_stable_and_none_when_absent(pair: Pair) -> None:
    ns = NsRef("b", pair.b.path)
    members = {PEERS: [f"10.213.7.{i}" for i in range(1, 100)] + ["fd10:213::9"]}
    async with Firewall() as fw:
        assert await fw.list_table(ns) is None
        await fw.apply(ns, render.render_workload(POLICY, members))
        first = await fw.list_table(ns)
        assert first is not None
        assert await fw.list_table(ns) == first
        await fw.apply(ns, render.render_workload(POLICY, members))
        assert await fw.list_table(ns) == first
        await fw.apply(ns, render.render_workload(POLICY, members, was={PEERS}))  # in place
        assert await fw.list_table(ns) == first
        await fw.apply(ns, render.render_removal())
        assert await fw.list_table(ns) is None
        await fw.apply(ns, render.render_removal())  # idempotent


async def test_backends_give_the_same_listing(pair: Pair) -> None:
    members = {PEERS: [pair.a4, pair.a6, "10.213.9.9"], OTHERS: []}
    pol = policy(
        [*POLICY.inbound, Allow("other", OTHERS, [Service("udp", 1000, 2000)])],
        POLICY.outbound,
    )
    script = render.render_workload(pol, members, frozenset({"db", "ping"}))
    in_place = render.render_workload(pol, members, frozenset({"db", "ping"}), was=set())
    a, b = NsRef("a", pair.a.path), NsRef("b", pair.b.path)
    async with Firewall("libnftables") as lib, Firewall("nsenter") as cli:
        await lib.apply(a, script)
        await cli.apply(b, in_place)
        listings = {
            await lib.list_table(a),
            await lib.list_table(b),
            await cli.list_table(a),
            await cli.list_table(b),
        }
    assert len(listings) == 1
    listing = listings.pop()
    assert listing is not None
    assert listing == pair.a.nft("-s", "list", "table", "inet", "segd")


async def test_a_failed_transaction_changes_nothing(pair: Pair) -> None:
    ns = NsRef("b", pair.b.path)
    async with Firewall() as fw:
        await fw.apply(ns, render.render_isolation())
        before = await fw.list_table(ns)
        script = render.workload_script(POLICY, {})
        # Refused by the parser: nothing is sent.
        with pytest.raises(NftError, match="syntax error"):
            await fw.apply(ns, Plan("bad", (script + "add rule inet segd input ?\n",)))
        # Refused by the kernel at the end of the batch: the replace before it is undone.
        late = Plan("late", (script + "add rule inet segd input jump nowhere\n",))
        with pytest.raises(NftError, match="Could not process rule"):
            await fw.apply(ns, late)
        # The same for a rewrite in place.
        in_place = render.render_workload(POLICY, {}, was=set()).txs[0]
        late = Plan("late", (in_place + "add rule inet segd input jump nowhere\n",))
        with pytest.raises(NftError, match="Could not process rule"):
            await fw.apply(ns, late)
        assert await fw.list_table(ns) == before


@pytest.mark.parametrize("backend", BACKENDS)
async def test_forget_frees_the_namespace_endpoint(backend: str, pair: Pair) -> None:
    async with Firewall(backend) as fw:  # type: ignore[arg-type]
        baseline = open_fds()
        for ref in (NsRef("a", pair.a.path), NsRef("b", pair.b.path)):
            await fw.apply(ref, render.render_isolation())
        assert fw.open_namespaces == 2
        assert open_fds() == baseline + 2  # a netlink socket or a namespace fd each
        await fw.forget(NsRef("a", pair.a.path))
        await fw.forget(NsRef("a", pair.a.path))  # twice is fine
        assert fw.open_namespaces == 1
        assert open_fds() == baseline + 1
    assert open_fds() == baseline - 1  # close() frees the rest, and the home netns fd


async def test_least_recently_used_endpoints_are_freed_beyond_max_open(pair: Pair) -> None:
    a, b = NsRef("a", pair.a.path), NsRef("b", pair.b.path)
    async with Firewall(max_open=1) as fw:
        baseline = open_fds()
        await fw.apply(a, render.render_isolation())
        await fw.apply(b, render.render_isolation())
        assert fw.open_namespaces == 1
        assert open_fds() == baseline + 1
        # The evicted namespace is bound again on its next use, still the right one.
        assert await fw.list_table(a) == await fw.list_table(b)
        await fw.apply(a, render.render_removal())
        assert await fw.list_table(a) is None
        assert await fw.list_table(b) is not None
        assert "table inet segd" not in pair.a.nft("list", "tables")
        assert fw.open_namespaces == 1


async def test_a_new_namespace_under_the_same_key_gets_a_new_context(pair: Pair) -> None:
    ns = NsRef("b", pair.b.path)
    async with Firewall() as fw:
        await fw.apply(ns, render.render_isolation())
        baseline = open_fds()
        # The "container" restarts: same key and path, new namespace.
        pair.b.recreate()
        assert await fw.list_table(ns) is None
        await fw.apply(ns, render.render_isolation())
        assert "table inet segd" in pair.b.nft("list", "tables")
        assert open_fds() == baseline  # the old context was freed, a new one made


async def test_a_vanished_namespace_raises_and_frees_its_context(make_netns: MakeNetns) -> None:
    c = make_netns("c")
    ns = NsRef("c", c.path)
    async with Firewall() as fw:
        baseline = open_fds()
        await fw.apply(ns, render.render_isolation())
        c.delete()
        with pytest.raises(NamespaceGone):
            await fw.list_table(ns)
        with pytest.raises(NamespaceGone):
            await fw.apply(ns, render.render_isolation())
        assert fw.open_namespaces == 0
        assert open_fds() == baseline


PROBE_TABLE = "segd_hostns_probe"


def drop_probe_table() -> None:
    subprocess.run(["nft", "delete", "table", "inet", PROBE_TABLE], capture_output=True)


async def test_a_container_path_into_the_host_namespace_is_refused(
    make_netns: MakeNetns, tmp_path: Path
) -> None:
    """However a container's path comes to lead into the host's namespace (here:
    it is re-pointed, as when the container's pid is reused by a host process),
    nothing is written there. The script is a harmless empty table."""
    c = make_netns("c")
    link = tmp_path / "ns"
    link.symlink_to(c.path)
    ns = NsRef("c", str(link))
    script = Plan("probe", (f"add table inet {PROBE_TABLE}\n",))
    before = host_tables()
    try:
        async with Firewall() as fw:
            await fw.apply(ns, script)
            assert PROBE_TABLE in c.nft("list", "tables")
            link.unlink()
            link.symlink_to("/proc/self/ns/net")
            with pytest.raises(HostNamespace):
                await fw.apply(ns, script)
            with pytest.raises(HostNamespace):
                await fw.apply(NsRef("h", "/proc/self/ns/net"), script)
            with pytest.raises(HostNamespace):
                await fw.list_table(NsRef("h", "/proc/self/ns/net"))
            assert fw.open_namespaces == 0
            assert os.stat("/proc/self/ns/net").st_ino in {i for _, i in fw.host_namespaces}
        assert host_tables() == before
    finally:
        drop_probe_table()


async def test_a_worker_that_cannot_return_home_is_replaced(pair: Pair) -> None:
    home = os.stat("/proc/thread-self/ns/net")
    homecomings: list[int] = []

    def flaky_setns(fd: int) -> None:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (home.st_dev, home.st_ino):
            homecomings.append(fd)
            if len(homecomings) == 2:  # 1: the worker's start-up check; 2: after entering `b`
                raise OSError(1, "Operation not permitted")

    host_before = host_tables()
    async with Firewall("libnftables", setns_fault=flaky_setns) as fw:
        ns = NsRef("b", pair.b.path)
        # The first worker is left inside `b` and is replaced; the job is retried
        # on a fresh worker and lands in `b` and nowhere else.
        await fw.apply(ns, render.render_isolation())
        assert len(homecomings) == 4
        await fw.apply(NsRef("a", pair.a.path), render.render_isolation())
        assert await fw.list_table(ns) is not None
    assert host_tables() == host_before
    assert "table inet segd" in pair.a.nft("list", "tables")


@pytest.mark.parametrize("known", [False, True], ids=["replaced", "rewritten in place"])
async def test_replacing_the_table_never_lets_a_packet_through(known: bool, pair: Pair) -> None:
    """Swap whole rulesets over and over under a flood that none allows: behind a
    shadow when the table is unknown, in place when the caller says what it holds."""
    a, b = pair.a, pair.b
    ns = NsRef("b", b.path)
    received = b.count_input(9999)
    other = policy([Allow("x", OTHERS, [tcp(1)])], [Allow("y", PEERS, [tcp(2)])])
    rulesets: list[tuple[Callable[[set[str] | None], Plan], set[str]]] = [
        (lambda was: render.render_isolation(was=was), set()),
        (lambda was: render.render_workload(POLICY, {PEERS: [pair.a4]}, was=was), {PEERS}),
        (
            lambda was: render.render_workload(other, {OTHERS: [pair.a4_other]}, was=was),
            {OTHERS, PEERS},
        ),
    ]
    async with Firewall() as fw:
        await fw.apply(ns, rulesets[0][0](None))
        was: set[str] = set()
        sender = a.flood_udp(pair.b4, 9999, 2.0, src=pair.a4_other)
        swaps = 0
        while sender.poll() is None:
            make, holds = rulesets[(swaps + 1) % 3]
            plan = make(was if known else None)
            assert len(plan.txs) == (1 if known else 3)
            await fw.apply(ns, plan)
            was = holds
            swaps += 1
        assert sender.stdout is not None
        sent = int(sender.stdout.read())
        assert swaps > 20 and sent > 1000
        assert received() == 0
        assert b.nft("list", "tables").count("segd") == 1  # the shadow is gone
        # Control: the flood arrives where the ruleset allows it.
        allow = policy([Allow("u", None, [Service("udp", 9999, 9999)])])
        await fw.apply(ns, render.render_workload(allow, {}, was=was if known else None))
        a.flood_udp(pair.b4, 9999, 0.2, src=pair.a4_other).wait(timeout=30)
        assert received() > 0


async def test_a_rewrite_in_place_ends_as_a_fresh_table_would(
    pair: Pair, make_netns: MakeNetns
) -> None:
    """From a table holding other sets, with a leftover shadow and changes behind our
    back (a policy turned to accept, an extra rule, an extra element): in the end the
    same listing as the table made from scratch in another namespace."""
    c, b = NsRef("c", make_netns("c").path), NsRef("b", pair.b.path)
    members = {PEERS: [pair.a4, pair.a6], OTHERS: ["10.213.9.9"]}
    before = policy([Allow("o", OTHERS, [tcp(7)])], [Allow("p", PEERS, [tcp(8)])])
    pair.b.serve(tcp=[5432, 6000])
    async with Firewall() as fw:
        await fw.apply(c, render.render_workload(POLICY, members))
        fresh = await fw.list_table(c)
        await fw.apply(b, render.render_workload(before, members))
        pair.b.nft("add rule inet segd input tcp dport 6000 accept")
        pair.b.nft("add chain inet segd input { policy accept; }")
        pair.b.nft(f"add element inet segd {PEERS}_v4 {{ {pair.a4_other} }}")
        assert pair.a.probe([Probe(pair.b4, 6000, src=pair.a4)]) == ["ok"]
        shadow = render.render_isolation().txs[1].split("add table inet segd\n")[0]
        await fw.apply(b, Plan("leftover shadow", (shadow,)))
        assert pair.a.probe([Probe(pair.b4, 6000, src=pair.a4)]) == ["timeout"]

        await fw.apply(b, render.render_workload(POLICY, members, was={OTHERS, PEERS}))
        assert await fw.list_table(b) == fresh
    assert pair.b.nft("list", "tables").count("segd") == 1  # the shadow is gone
    probes = {
        Probe(pair.b4, 5432, src=pair.a4): "ok",
        Probe(pair.b4, 5432, src=pair.a4_other): "timeout",
        Probe(pair.b4, 6000, src=pair.a4): "timeout",
    }
    assert dict(zip(probes, pair.a.probe(list(probes)), strict=True)) == probes


async def test_a_table_not_of_our_shape_is_replaced_instead(pair: Pair) -> None:
    """A chain of ours on another hook: the rewrite in place is refused, changing
    nothing, and the plan falls back to the replace behind a shadow."""
    b = NsRef("b", pair.b.path)
    pair.b.serve(tcp=[5432])
    pair.b.nft(
        "add table inet segd; add chain inet segd input"
        " { type filter hook prerouting priority 0; policy accept; }"
    )
    async with Firewall() as fw:
        with structlog.testing.capture_logs() as logs:
            await fw.apply(b, render.render_workload(POLICY, {PEERS: [pair.a4]}, was=set()))
        listing = await fw.list_table(b)
    warned = [
        (e["event"], e.get("plan"), e.get("fallback")) for e in logs if e["log_level"] == "warning"
    ]
    assert warned == [("firewall.fallback", "workload", "workload_replace")]
    assert listing is not None and "hook prerouting" not in listing
    assert pair.b.nft("list", "tables").count("segd") == 1
    probes = [Probe(pair.b4, 5432, src=pair.a4), Probe(pair.b4, 5432, src=pair.a4_other)]
    assert pair.a.probe(probes) == ["ok", "timeout"]


async def test_a_large_ruleset_applies_whole(pair: Pair) -> None:
    names = [f"ls_{i:016x}" for i in range(20)]
    sets = {n: [f"10.213.{100 + i}.{j}" for j in range(1, 11)] for i, n in enumerate(names)}
    pol = policy(
        [Allow(f"r{i}", n, [tcp(5000 + i)]) for i, n in enumerate(names)],
        [Allow(f"o{i}", n, [tcp(6000 + i)]) for i, n in enumerate(names)],
    )
    async with Firewall() as fw:
        ns = NsRef("b", pair.b.path)
        await fw.apply(ns, render.render_workload(pol, sets))
        listing = await fw.list_table(ns)
    assert listing is not None
    assert len(re.findall(r"10\.213\.\d+\.\d+", listing)) == 200
    assert listing.count(" accept comment ") == 4 * 20  # per chain: v4 and v6 rule each


BLOCKS = "ip_00000000000000cc"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_set_of_address_blocks_admits_exactly_its_blocks(backend: str, pair: Pair) -> None:
    """ip: peers: an interval set of CIDRs (overlapping ones merged), rewritten in
    place to a table without it and back."""
    a, b = pair.a, pair.b
    b.serve(tcp=[5432])
    ns = NsRef("b", b.path)
    pol = policy([Allow("ext", BLOCKS, [tcp(5432)])])
    sets = {BLOCKS: ["10.213.0.0/31", "10.213.0.0/32", "fd10:213::/127", "192.0.2.0/24"]}
    probes = {
        Probe(pair.b4, 5432, src=pair.a4): "ok",  # .1 is in 10.213.0.0/31
        Probe(pair.b6, 5432, src=pair.a6): "ok",
        Probe(pair.b4, 5432, src=pair.a4_other): "timeout",  # .3 is not
        Probe(pair.b6, 5432, src=pair.a6_other): "timeout",
    }
    async with Firewall(backend) as fw:  # type: ignore[arg-type]
        await fw.apply(ns, render.render_workload(pol, sets))
        assert "flags interval" in b.nft("list", "set", "inet", "segd", f"{BLOCKS}_v4")
        assert dict(zip(probes, a.probe(list(probes)), strict=True)) == probes
        other = policy([Allow("db", PEERS, [tcp(5432)])])
        await fw.apply(ns, render.render_workload(other, {PEERS: [pair.a4_other]}, was={BLOCKS}))
        assert "ip_" not in b.nft("list", "table", "inet", "segd")
        flipped = [Probe(pair.b4, 5432, src=pair.a4), Probe(pair.b4, 5432, src=pair.a4_other)]
        assert a.probe(flipped) == ["timeout", "ok"]
        await fw.apply(ns, render.render_workload(pol, sets, was={PEERS}))
        assert dict(zip(probes, a.probe(list(probes)), strict=True)) == probes
        assert render.render_set_delta(sets, sets, {BLOCKS}) is None
