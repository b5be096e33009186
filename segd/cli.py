"""The `segd` command: the daemon modes, the admin client, and `version`.

    segd server|orchestrator|agent|allinone [--config FILE] [--data-dir DIR] [--listen HOST:PORT]
    segd agent [--activation-code CODE | --activation-code-file FILE]   (or $SEGD_ACTIVATION_CODE)
    segd ctl ...
    segd boot-gate        (at boot, before Docker: every container dark until the agent admits it)
    segd version

Flags override the config file; config errors are reported before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import msgspec

from segd import __version__, config, log, preflight
from segd.errors import SegdError

MODES = ("server", "orchestrator", "agent", "allinone")
ACTIVATION_CODE_ENV = "SEGD_ACTIVATION_CODE"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segd", description="label-based container micro-segmentation")
    sub = p.add_subparsers(dest="mode", metavar="MODE")
    for mode in MODES:
        m = sub.add_parser(mode, help=f"run the {mode}")
        m.add_argument("--config", metavar="FILE", help="TOML config file")
        m.add_argument("--data-dir", metavar="DIR", help="state directory")
        m.add_argument("--listen", metavar="HOST:PORT", help="API listen address")
        if mode == "agent":
            code = m.add_mutually_exclusive_group()
            code.add_argument(
                "--activation-code",
                metavar="CODE",
                default="",
                help="register with the server using this code (other users of the host "
                f"can read it in the process list: prefer the file or {ACTIVATION_CODE_ENV})",
            )
            code.add_argument(
                "--activation-code-file",
                metavar="FILE",
                default="",
                help="register with the server using the code in FILE",
            )
            m.add_argument("--server", metavar="URL", help="segmentation server URL")
    sub.add_parser("ctl", help="admin client (see `segd ctl --help`)", add_help=False)
    sub.add_parser("version", help="print the version")
    sub.add_parser(
        "boot-gate",
        help="load the host gate with nothing admitted (at boot, before Docker starts)",
    )
    pre = sub.add_parser("preflight", help="what the agent would use on this machine")
    pre.add_argument("--config", metavar="FILE", help="TOML config file")
    demo = sub.add_parser("demo", help="run the live demo (see `make demo`)")
    demo.add_argument("--data-dir", metavar="DIR", default="", help="(the one-host demo)")
    demo.add_argument(
        "--hosts",
        metavar="N",
        type=int,
        default=1,
        help="1: the one-host demo; 2-8: the shop spread over N simulated hosts (the test bed)",
    )
    demo.add_argument(
        "--no-wait",
        action="store_true",
        help="print the matrix, clean up and exit instead of waiting for Ctrl-C",
    )
    return p


def _fail(msg: str, code: int = 1) -> int:
    print(f"segd: {msg}", file=sys.stderr)
    return code


def _override(cfg: config.Config, args: argparse.Namespace, path: str) -> config.Config:
    """Apply command-line flags over the file and re-validate the result."""
    data: dict[str, Any] = msgspec.to_builtins(cfg)
    section = {"server": "server", "orchestrator": "orchestrator", "agent": "agent"}.get(args.mode)
    if args.listen:
        if args.mode == "agent":
            raise config.ConfigError("", "--listen", "the agent has no listener")
        if section:
            data[section]["listen"] = args.listen
        else:
            data["server"]["listen"] = args.listen
    if args.data_dir:
        if args.mode == "agent":
            data["agent"]["state_dir"] = args.data_dir
        elif section:
            data[section]["data_dir"] = args.data_dir
    if args.mode == "agent" and getattr(args, "server", None):
        data["agent"]["server"] = args.server
    return config.decode(data, path or "command line")


def activation_code(flag: str, file: str, env: Mapping[str, str]) -> str:
    """The agent's activation code: `--activation-code`, else the content of
    `--activation-code-file`, else $SEGD_ACTIVATION_CODE ("" when none: the
    `[agent] activation_code` of the config file applies)."""
    if flag:
        return flag.strip()
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            reason = f"cannot read {file}: {why}"
            raise config.ConfigError("", "--activation-code-file", reason) from None
        if not text.strip():
            raise config.ConfigError("", "--activation-code-file", f"{file} is empty")
        return text.strip()
    return env.get(ACTIVATION_CODE_ENV, "").strip()


def _run(coro: Coroutine[Any, Any, None]) -> int:
    """Run a daemon coroutine; SIGTERM/SIGINT cancel it so it can drain and stop."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await coro

    tune_gc()
    asyncio.run(main())
    return 0


def tune_gc() -> None:
    """A daemon keeps a large state for its whole life (the compiled policy, its
    containers) and makes many short-lived objects per request. Set what is
    imported by now aside from collection, and collect the young generation
    every 20,000 allocations rather than 700, so collections walk the same
    long-lived objects far less often (cycles are still collected)."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 10)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ctl":
        from segd.ctl import ctl_main

        return ctl_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.mode is None:
        _parser().print_help(sys.stderr)
        return 2
    if args.mode in _VERBS:
        return _VERBS[args.mode](args)
    try:
        cfg = _configure(args)
    except config.ConfigError as e:
        return _fail(str(e), 2)
    log.setup(cfg.log.level, cfg.log.format)
    try:
        return _start(args, cfg)
    except SegdError as e:
        return _fail(e.message)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        raise


def _version(args: argparse.Namespace) -> int:
    print(f"segd {__version__}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.hosts != 1:
        from segd.demo_fleet import fleet_demo_main

        return fleet_demo_main(hosts=args.hosts, wait=not args.no_wait)
    from segd.demo import demo_main

    return demo_main(data_dir=args.data_dir, wait=not args.no_wait)


def _boot_gate(args: argparse.Namespace) -> int:
    """`segd boot-gate`: every container dark until the agent admits it."""
    from segd.agent.bootgate import load
    from segd.firewall.kernel import NftError

    log.setup("info", "auto")
    try:
        asyncio.run(load())
    except (NftError, OSError) as e:
        return _fail(f"cannot load the host gate: {e}")
    return 0


def _preflight(args: argparse.Namespace) -> int:
    """`segd preflight`: what the agent would use here; 1 when it lacks something."""
    path: str | None = args.config
    try:
        cfg = config.load(path) if path else config.Config()
    except config.ConfigError as e:
        return _fail(str(e), 2)
    lines, ok = preflight.agent_report(cfg.agent)
    print("\n".join(lines))
    return 0 if ok else 1


_VERBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "version": _version,
    "preflight": _preflight,
    "boot-gate": _boot_gate,
    "demo": _demo,
}


def _configure(args: argparse.Namespace) -> config.Config:
    """The mode's config: the file, the flags over it, the agent's activation
    code, and the preflight checks; ConfigError names what is wrong."""
    cfg = config.load(args.config) if args.config else config.Config()
    if args.mode != "allinone":
        cfg = _override(cfg, args, args.config or "")
    if args.mode == "agent":
        code = activation_code(args.activation_code, args.activation_code_file, os.environ)
        args.activation_code = code
    preflight.check(cfg, args.mode, args.config or "", listen=args.listen or "")
    return cfg


def _start(args: argparse.Namespace, cfg: config.Config) -> int:
    from segd.http.connections import raise_open_files_limit

    soft, hard = raise_open_files_limit()
    # Debug: a daemon that cannot start says so in one line, nothing before it.
    log.get("segd").debug("process.open_files", soft=soft, hard=hard)
    if args.mode == "server":
        from segd.server.app import run_server

        return _run(run_server(cfg.server))
    if args.mode == "agent":
        from segd.agent.agent import Agent

        agent = Agent(cfg.agent, activation_code=args.activation_code)
        return _run(agent.run())
    if args.mode == "allinone":
        try:
            from segd.allinone import run_allinone
        except ImportError:
            return _fail("mode 'allinone' is not available in this build", 2)
        return _run(run_allinone(cfg, data_dir=args.data_dir, listen=args.listen))
    try:
        from segd.orchestrator.app import run_orchestrator
    except ImportError:
        return _fail("mode 'orchestrator' is not available in this build", 2)
    return _run(run_orchestrator(cfg.orchestrator))
