"""Before any kernel work: the root module says whether this process can do it.

Run as root with capabilities dropped (`setpriv`), so the refusal is the one a
user without them would get.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel


def _without(caps: str, code: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv")
    argv = ["setpriv", f"--bounding-set={caps}", "--inh-caps=-all", sys.executable, "-c", code]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_without_the_capabilities_the_host_lock_is_refused_in_one_line(tmp_path: Path) -> None:
    lock = tmp_path / "run" / "agent.lock"
    code = f"from segd.firewall.kernel import take_host_lock; take_host_lock({str(lock)!r})"
    proc = _without("-all", code)
    assert proc.returncode == 1
    assert proc.stderr == (
        "segd agent: cannot enforce: needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        " to program nftables in namespaces\n"
    )
    assert not lock.parent.exists()  # nothing was made


@pytest.mark.parametrize(
    ("caps", "missing"),
    [("-net_admin", "CAP_NET_ADMIN"), ("-sys_admin", "CAP_SYS_ADMIN"), ("+all", None)],
)
def test_unavailable_names_what_is_missing(caps: str, missing: str | None) -> None:
    code = "from segd.firewall.kernel import unavailable; print(unavailable())"
    proc = _without(caps, code)
    assert proc.returncode == 0, proc.stderr
    want = f"needs root ({missing}) to program nftables in namespaces" if missing else "None"
    assert proc.stdout.strip() == want


def test_with_them_the_lock_is_taken_once(tmp_path: Path) -> None:
    lock = tmp_path / "agent.lock"
    code = (
        "from segd.firewall.kernel import take_host_lock\n"
        f"take_host_lock({str(lock)!r}); take_host_lock({str(lock)!r})\n"
    )
    proc = _without("+all", code)
    assert proc.returncode == 1
    assert proc.stderr == f"segd agent: another agent is running on this host ({lock})\n"
