"""`python -m segd.bed up|down|status|exec`: the multi-host test bed by hand."""

from __future__ import annotations

import argparse
import os
import sys
import time

from segd.bed import plan, sweep
from segd.bed.bed import Bed
from segd.bed.system import BedError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m segd.bed", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="bring up N simulated hosts (removes an earlier bed)")
    up.add_argument("--hosts", type=int, default=3, metavar="N")
    up.add_argument("--no-image", action="store_true", help=f"do not load {plan.IMAGE}")
    sub.add_parser("down", help="remove the bed and anything a crashed one left")
    sub.add_parser("status", help="hosts, addresses, engines and their memory")
    ex = sub.add_parser("exec", help="run a command on host I (DOCKER_HOST set)")
    ex.add_argument("host", type=int, metavar="I")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    return p


def _status(bed: Bed) -> None:
    print(f"underlay {plan.UNDERLAY} on bridge {plan.BRIDGE}, root {plan.ROOT_ADDRESS}")
    for h in bed.hosts:
        mem = h.memory_kib()
        rss = " ".join(f"{k} {v // 1024 if v else '?'} MiB" for k, v in mem.items())
        print(f"{h.name}  {h.address}  DOCKER_HOST={h.docker_url}  {rss}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "up":
            bed = Bed.up(args.hosts, images=() if args.no_image else (plan.IMAGE,))
            _status(bed)
            print(f"up in {bed.up_seconds:.1f} s; `python -m segd.bed down` removes it")
        elif args.cmd == "down":
            started = time.monotonic()
            left = sweep.down()
            if left:
                print("segd.bed: could not remove: " + "; ".join(left), file=sys.stderr)
                return 1
            print(f"down in {time.monotonic() - started:.1f} s")
        elif args.cmd == "status":
            _status(Bed.attach())
        else:
            cmd = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not cmd:
                raise BedError("exec: give a command, e.g. `exec 1 -- docker ps`")
            h = Bed.attach().host(args.host)
            os.execvpe(h.argv(cmd)[0], h.argv(cmd), h.env())  # noqa: S606 - the user asked for it
    except BedError as e:
        print(f"segd.bed: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
