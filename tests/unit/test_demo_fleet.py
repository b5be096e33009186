"""`segd demo --hosts N`: where the shop's containers go, and what is refused
before anything starts."""

from __future__ import annotations

import subprocess
import sys
from typing import cast

import pytest

from segd.bed import Bed, BedError
from segd.bed.fleet import Fleet
from segd.demo_fleet import MAX_HOSTS, FleetDemo, placement


def test_the_tiers_go_to_hosts_one_two_three_and_the_intruder_after_them() -> None:
    assert placement(3) == {"web": 1, "api": 2, "db": 3, "intruder": 1}
    assert placement(2) == {"web": 1, "api": 2, "db": 1, "intruder": 2}
    assert placement(5) == {"web": 1, "api": 2, "db": 3, "intruder": 4}


def test_every_placement_spreads_the_allowed_pairs_over_two_hosts() -> None:
    for n in range(2, MAX_HOSTS + 1):
        where = placement(n)
        assert where["web"] != where["api"] and where["api"] != where["db"], n
        assert set(where.values()) <= set(range(1, n + 1))


@pytest.mark.parametrize("hosts", [0, -1, MAX_HOSTS + 1, 33])
def test_a_host_count_out_of_range_is_refused(hosts: int) -> None:
    with pytest.raises(ValueError, match="--hosts"):
        placement(hosts)


@pytest.mark.parametrize("hosts", ["0", "9", "x"])
def test_segd_demo_refuses_a_bad_host_count_in_one_line_before_starting(hosts: str) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "segd", "demo", "--hosts", hosts, "--no-wait"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 or "usage:" in p.stderr, p.stderr
    assert "hosts" in p.stderr


class _FailingFleet:
    def close(self) -> None:
        raise BedError("an agent would not stop")


class _Bed:
    def __init__(self) -> None:
        self.downs = 0

    def down(self) -> list[str]:
        self.downs += 1
        return []


def test_the_bed_goes_down_even_when_stopping_the_fleet_fails() -> None:
    demo = FleetDemo(3)
    bed = _Bed()
    demo.fleet, demo.bed = cast(Fleet, _FailingFleet()), cast(Bed, bed)
    with pytest.raises(BedError):
        demo.cleanup()
    assert bed.downs == 1
    assert not demo.dir.exists()
