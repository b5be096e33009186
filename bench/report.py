"""Figures, targets and the printed table; the JSON written for every run.

A benchmark returns one `Section`: figures (each with the baseline measured in
the same run, and the targets it is held to) and free-form details. Ratios are
`value / baseline` ("of baseline") or `baseline / value` ("x faster").
Percentiles are nearest-rank: p99 of 50 samples is the largest one.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

Op = Literal["<=", ">=", "=="]
RatioKind = Literal["of", "faster"]
Size = Literal["tiny", "full"]


class Target(msgspec.Struct, frozen=True):
    """`value` (or `ratio`) `op` `limit`."""

    op: Op
    limit: float
    on: Literal["value", "ratio"] = "value"

    def check(self, fig: Figure) -> bool | None:
        got = fig.value if self.on == "value" else fig.ratio
        if got is None or math.isnan(got):
            return None
        if self.op == "<=":
            return got <= self.limit
        if self.op == ">=":
            return got >= self.limit
        return got == self.limit

    def text(self, unit: str, ratio_kind: RatioKind | None) -> str:
        sym = {"<=": "≤", ">=": "≥", "==": "="}[self.op]
        lim = f"{int(self.limit):,}" if self.limit == int(self.limit) else f"{self.limit:g}"
        if self.on == "value":
            return f"{sym} {lim} {unit}".rstrip()
        if ratio_kind == "faster":
            return f"{sym} {lim}x faster"
        return f"{sym} {lim} of baseline"


class Figure(msgspec.Struct, kw_only=True):
    key: str  # stable id, e.g. "enforce.one_by_one.from_start.p99"
    label: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_label: str = ""
    ratio: float | None = None
    ratio_kind: RatioKind | None = None
    targets: list[Target] = []
    met: bool | None = None  # None: no target

    def target_text(self) -> str:
        return "; ".join(t.text(self.unit, self.ratio_kind) for t in self.targets)


def figure(
    key: str,
    label: str,
    value: float,
    unit: str,
    *,
    baseline: float | None = None,
    baseline_label: str = "",
    ratio: RatioKind | None = None,
    targets: Sequence[Target] = (),
) -> Figure:
    """A figure with its ratio to the baseline and whether its targets are met."""
    r: float | None = None
    if ratio is not None and baseline is not None:
        num, den = (value, baseline) if ratio == "of" else (baseline, value)
        r = num / den if den else math.inf
    fig = Figure(
        key=key,
        label=label,
        value=float(value),
        unit=unit,
        baseline=None if baseline is None else float(baseline),
        baseline_label=baseline_label,
        ratio=r,
        ratio_kind=ratio if r is not None else None,
        targets=list(targets),
    )
    if fig.targets:
        # A figure that could not be measured (NaN) misses its target.
        fig.met = all(t.check(fig) is True for t in fig.targets)
    return fig


class Section(msgspec.Struct, kw_only=True):
    name: str
    title: str
    figures: list[Figure] = []
    details: dict[str, Any] = {}
    seconds: float = 0.0
    error: str = ""


class Report(msgspec.Struct, kw_only=True):
    meta: dict[str, Any]
    sections: list[Section]
    met: int = 0
    missed: int = 0


# ---- statistics -----------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 0.5),
        "p99": pct(values, 0.99),
        "max": max(values) if values else math.nan,
        "min": min(values) if values else math.nan,
    }


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# ---- the machine ----------------------------------------------------------------------


def _cmd(*argv: str) -> str:
    if shutil.which(argv[0]) is None:
        return ""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return p.stdout.strip()


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else ""
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    osname = ""
    try:
        with open("/etc/os-release") as f:
            m = re.search(r'^PRETTY_NAME="?([^"\n]+)', f.read(), re.M)
            osname = m.group(1) if m else ""
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "os": osname,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "docker": _cmd("docker", "version", "--format", "{{.Server.Version}}"),
        "nftables": _cmd("nft", "--version"),
        "commit": _cmd("git", "rev-parse", "--short", "HEAD"),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---- the table ------------------------------------------------------------------------


def _num(v: float) -> str:
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "inf"
    a = abs(v)
    if v == int(v):
        return f"{int(v):,}"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _value(v: float | None, unit: str) -> str:
    return "" if v is None else f"{_num(v)} {unit}".rstrip()


def _ratio(f: Figure) -> str:
    if f.ratio is None:
        return ""
    return f"{_num(f.ratio)}x faster" if f.ratio_kind == "faster" else f"{_num(f.ratio)}x"


def _status(f: Figure) -> str:
    return {True: "met", False: "MISSED", None: ""}[f.met] if f.targets else ""


def table(report: Report) -> str:
    head = ("figure", "value", "baseline (same run)", "vs base", "target", "")
    rows: list[tuple[str, ...] | str] = []
    for s in report.sections:
        rows.append(f"{s.title}  [{s.seconds:.0f} s]")
        if s.error:
            rows.append(f"  ERROR: {s.error}")
        for f in s.figures:
            base = f"{f.baseline_label} {_value(f.baseline, f.unit)}".strip()
            rows.append(
                (
                    "  " + f.label,
                    _value(f.value, f.unit),
                    base,
                    _ratio(f),
                    f.target_text(),
                    _status(f),
                )
            )
    cells = [r for r in rows if isinstance(r, tuple)] + [head]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]

    def line(r: tuple[str, ...]) -> str:
        parts = [r[0].ljust(widths[0]), r[1].rjust(widths[1])]
        parts += [r[i].ljust(widths[i]) for i in range(2, len(r))]
        return "  ".join(parts).rstrip()

    m = report.meta
    nft = str(m.get("nftables", "")).split(" (")[0]
    out = [
        f"segd benchmarks, size {m.get('size')}, commit {m.get('commit')}, {m.get('started')}",
        f"machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB, "
        f"{m.get('os')}, kernel {m.get('kernel')}, Docker {m.get('docker')}, {nft}, "
        f"Python {m.get('python')}",
        "",
        line(head),
        "-" * len(line(head)),
    ]
    for r in rows:
        out.append(r if isinstance(r, str) else line(r))
    out.append("")
    out.append(
        f"targets: {report.met} met, {report.missed} missed; ran in {m.get('seconds', 0):.0f} s"
    )
    out += [f"warning: {w}" for w in m.get("warnings", [])]
    return "\n".join(out)


def finish(meta: dict[str, Any], sections: list[Section]) -> Report:
    figs = [f for s in sections for f in s.figures]
    return Report(
        meta=meta,
        sections=sections,
        met=sum(1 for f in figs if f.met is True),
        missed=sum(1 for f in figs if f.met is False),
    )


def to_json(report: Report) -> bytes:
    # NaN and inf are not JSON: they become null.
    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return o

    return msgspec.json.format(msgspec.json.encode(clean(msgspec.to_builtins(report))), indent=2)
