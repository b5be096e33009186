"""Checks that need the machine, run after the config parses and before a
mode creates anything: TLS files load, the listen address is free, and an
agent in the segd mesh has the WireGuard it is set to use. `agent_report` is
`segd preflight`: what the agent would use on this machine.

A failure is a ConfigError naming the file and the key, like any config error.
"""

from __future__ import annotations

import errno
import socket
import ssl

from segd import config


def _tls(path: str, section: str, tls: config.TLSConfig) -> None:
    if not tls.cert:
        return
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except FileNotFoundError as e:
        raise config.ConfigError(path, f"{section}.tls.cert", f"cannot read {e.filename}") from None
    except (OSError, ssl.SSLError) as e:
        reason = f"cannot load certificate and key: {e}".replace("\n", " ")
        raise config.ConfigError(path, f"{section}.tls.cert", reason) from None
    if tls.client_ca:
        try:
            ctx.load_verify_locations(tls.client_ca)
        except (OSError, ssl.SSLError) as e:
            reason = f"cannot load CA file {tls.client_ca}: {e}".replace("\n", " ")
            raise config.ConfigError(path, f"{section}.tls.client_ca", reason) from None


def _free(path: str, key: str, listen: str) -> None:
    host, port = config.parse_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise config.ConfigError(path, key, f"cannot resolve {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise config.ConfigError(path, key, f"{listen} is already in use") from None
            raise config.ConfigError(
                path, key, f"cannot listen on {listen}: {e.strerror}"
            ) from None


def check(cfg: config.Config, mode: str, path: str, *, listen: str = "") -> None:
    """Raise ConfigError when `mode` cannot start with `cfg` on this machine."""
    if mode in ("server", "allinone"):
        _tls(path, "server", cfg.server.tls)
        _free(path or "command line", "server.listen", listen or cfg.server.listen)
    elif mode == "orchestrator":
        _tls(path, "orchestrator", cfg.orchestrator.tls)
        _free(path or "command line", "orchestrator.listen", cfg.orchestrator.listen)
    elif mode == "agent" and cfg.agent.mesh.enabled:
        _wireguard(path, cfg.agent.mesh)
    if mode == "agent" and cfg.agent.server_ca:
        try:
            ssl.create_default_context(cafile=cfg.agent.server_ca)
        except (OSError, ssl.SSLError) as e:
            reason = f"cannot load CA file: {e}".replace("\n", " ")
            raise config.ConfigError(path, "agent.server_ca", reason) from None


def _wireguard(path: str, mesh: config.AgentMeshConfig) -> None:
    from segd.firewall.kernel import kernel_has_wireguard, wireguard_go
    from segd.mesh.choice import NoWireGuard, choose

    try:
        choose(mesh.wireguard, kernel_has_wireguard(), wireguard_go())
    except NoWireGuard as e:
        raise config.ConfigError(path, "agent.mesh.wireguard", str(e)) from None


def agent_report(agent: config.AgentConfig) -> tuple[list[str], bool]:
    """One line per thing the agent needs (enforcement; WireGuard for the mesh);
    False when something it needs is missing."""
    from segd.firewall.kernel import kernel_has_wireguard, unavailable, wireguard_go
    from segd.mesh.choice import describe

    problem = unavailable()
    lines = [f"enforcement: {'ok' if problem is None else 'no: ' + problem}"]
    wg = describe(agent.mesh.wireguard, kernel_has_wireguard(), wireguard_go())
    state = "enabled" if agent.mesh.enabled else "disabled"
    lines.append(f"mesh: {state}; wireguard = {agent.mesh.wireguard!r} -> {wg}")
    ok = problem is None and not (agent.mesh.enabled and wg.startswith("none"))
    return lines, ok
