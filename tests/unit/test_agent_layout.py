"""The agent's pure core stays pure: the reconciler, the host's state, the ops and
the events import no I/O (no event loop, no HTTP, no Docker, no kernel)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.unit.test_firewall_layout import ROOT, _imports

PURE = ["reconcile", "host", "ops", "events", "sharing"]
IO = ("asyncio", "aiohttp", "aiodocker", "socket", "segd.firewall.kernel", "segd.agent.client")


@pytest.mark.parametrize("name", PURE)
def test_pure_module_imports_no_io(name: str) -> None:
    found = _imports(ROOT / "segd" / "agent" / f"{name}.py")
    assert sorted(m for m in found if m.startswith(IO)) == []


def test_importing_the_pure_core_loads_no_kernel_binding() -> None:
    code = "import sys\n" + "".join(f"import segd.agent.{m}\n" for m in PURE)
    code += "print('ctypes' in sys.modules, 'asyncio' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]
