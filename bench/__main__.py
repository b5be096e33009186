"""`python -m bench [--only NAME[,NAME...]] [--size tiny|full] [--json PATH]`

Runs the benchmarks in order, prints one table and writes the JSON report.
Exits 1 when a benchmark could not run (a missed target is not a failure).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path
from typing import cast

from bench import NAMES
from bench.report import Section, Size, finish, machine, table, to_json
from segd import log

MODULES = {
    "enforce": "bench.enforce",
    "pairing": "bench.pairing",
    "compile": "bench.compile_scale",
    "apply": "bench.apply_cost",
    "footprint": "bench.footprint",
    "flood": "bench.flood",
    "ingest": "bench.ingest",
    "flows": "bench.flows",
    "fleet": "bench.fleet",
}
DOCKER = {"enforce", "footprint"}
DEFAULT_JSON = Path(__file__).parent / "results" / "latest.json"


def _names(only: str) -> list[str]:
    if not only:
        return list(NAMES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise SystemExit(
            f"bench: unknown benchmark {', '.join(unknown)} (known: {', '.join(NAMES)})"
        )
    return [n for n in NAMES if n in names]


def _run_one(name: str, size: Size) -> Section:
    t0 = time.monotonic()
    print(f"bench: {name} ({size}) ...", file=sys.stderr, flush=True)
    try:
        mod = importlib.import_module(MODULES[name])
        section = cast(Section, mod.run(size))
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        section = Section(name=name, title=name, error=f"{type(e).__name__}: {e}")
    section.seconds = round(time.monotonic() - t0, 1)
    print(f"bench: {name} done in {section.seconds:.0f} s", file=sys.stderr, flush=True)
    return section


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--only", default="", help=f"comma-separated, from: {', '.join(NAMES)}")
    ap.add_argument("--size", choices=("tiny", "full"), default="full")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the report")
    args = ap.parse_args(argv)
    names = _names(args.only)
    size = cast(Size, args.size)
    log.setup(level="warning", fmt="json")

    from bench import containers, stack

    meta = machine()
    meta["size"] = size
    meta["benchmarks"] = names
    warnings: list[str] = []
    others = stack.other_agents()
    if others:
        warnings.append(
            f"other segd agents are running (pids {others}): they share the host gate "
            "and Docker events, and may disturb the Docker benchmarks"
        )
    if DOCKER & set(names):
        try:
            stale = containers.remove_stale()
            if stale:
                warnings.append(f"removed {stale} containers left by an earlier, killed run")
        except (stack.BenchError, OSError) as e:
            warnings.append(f"could not look for leftover containers: {e}")
    for w in warnings:
        print(f"bench: warning: {w}", file=sys.stderr)
    meta["warnings"] = warnings

    t0 = time.monotonic()
    sections = [_run_one(n, size) for n in names]
    meta["seconds"] = round(time.monotonic() - t0, 1)
    for s in sections:
        foreign = s.details.get("foreign_keyed_containers")
        if foreign:
            w = (
                f"{s.name}: {len(foreign)} keyed containers of another segd stack ran meanwhile; "
                "its agent also enforces ours, so these figures may be disturbed"
            )
            print(f"bench: warning: {w}", file=sys.stderr)
            warnings.append(w)
    report = finish(meta, sections)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_bytes(to_json(report) + b"\n")
    print(table(report))
    print(f"\nwritten: {args.json}")
    return 1 if any(s.error for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
