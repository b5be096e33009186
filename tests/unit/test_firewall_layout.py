"""Where kernel access lives: one root module, renderers that load nothing native."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE = [
    "segd.firewall",
    "segd.firewall.plan",
    "segd.firewall.conntrack",
    "segd.firewall.nftext",
    "segd.firewall.render",
    "segd.firewall.gate",
]
KERNEL = "segd.firewall.kernel"


def _loads_ctypes(*modules: str) -> bool:
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules)
    code += "print('ctypes' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip() == "True"


def test_importing_the_pure_modules_loads_no_ctypes() -> None:
    assert not _loads_ctypes(*PURE)


def test_importing_the_root_module_does() -> None:
    """The check above can fail: the root module's binding is ctypes."""
    assert _loads_ctypes(KERNEL)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _sources(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def test_one_module_imports_ctypes() -> None:
    users = [p.relative_to(ROOT) for p in _sources("segd") if "ctypes" in _imports(p)]
    assert users == [Path("segd/firewall/kernel/_ffi.py")]


@pytest.mark.parametrize("where", ["segd", "bench"])
def test_only_the_root_module_uses_its_private_parts(where: str) -> None:
    inside = ROOT / "segd" / "firewall" / "kernel"
    private = f"{KERNEL}._"
    offenders = [
        str(p.relative_to(ROOT))
        for p in _sources(where)
        if inside not in p.parents and any(m.startswith(private) for m in _imports(p))
    ]
    assert offenders == []
