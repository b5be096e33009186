"""Which lock an agent takes: one per network namespace, the historical path in the
initial one (segd.agent.hostlock)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from segd.agent import hostlock
from segd.agent.hostlock import HOST_LOCK, NET_NS_INIT_INO, kernel_fixes_init_netns, lock_path_for

inodes = st.integers(min_value=1, max_value=2**32)


def test_the_initial_namespace_keeps_the_historical_lock() -> None:
    assert lock_path_for(4026531840, 4026531840) == "/run/segd/agent.lock" == HOST_LOCK


def test_another_namespace_locks_a_path_named_after_its_inode() -> None:
    assert lock_path_for(4026532301, 4026531840) == "/run/segd/agent.4026532301.lock"


def test_an_unreadable_namespace_falls_back_to_the_default_lock() -> None:
    assert lock_path_for(None, 4026531840) == HOST_LOCK
    assert lock_path_for(4026532301, None) == HOST_LOCK
    assert lock_path_for(None, None) == HOST_LOCK


@given(inodes, inodes, inodes)
def test_agents_share_a_lock_exactly_when_they_share_a_namespace(a: int, b: int, init: int) -> None:
    assert (lock_path_for(a, init) == lock_path_for(b, init)) == (a == b)


@pytest.mark.parametrize(
    ("release", "fixed"),
    [
        ("6.18.0-1-cloud-amd64", True),
        ("6.19.2", True),
        ("7.0.0", True),
        ("6.17.9-arch1", False),
        ("6.1.0-28-amd64", False),
        ("5.10.0", False),
        ("garbage", False),
        ("", False),
    ],
)
def test_kernels_from_6_18_number_the_initial_namespace_fixed(release: str, fixed: bool) -> None:
    assert kernel_fixes_init_netns(release) is fixed


def test_this_process_locks_by_its_own_namespace() -> None:
    own = os.stat("/proc/self/ns/net").st_ino
    assert hostlock.netns_inode(hostlock.OWN_NETNS) == own
    assert hostlock.netns_inode("/nonexistent/ns/net") is None
    init = hostlock.initial_netns_inode()
    if kernel_fixes_init_netns(os.uname().release):
        assert init == NET_NS_INIT_INO
    assert hostlock.host_lock_path() == lock_path_for(own, init)
