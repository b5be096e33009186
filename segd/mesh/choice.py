"""Which WireGuard the mesh runs: the kernel's or wireguard-go (pure)."""

from __future__ import annotations

from typing import Literal

Setting = Literal["auto", "kernel", "userspace"]
Path = Literal["kernel", "userspace"]


class NoWireGuard(Exception):
    """The setting asks for a WireGuard this machine does not have."""


def choose(setting: Setting, kernel_has_wireguard: bool, wireguard_go: str | None) -> Path:
    """`auto` prefers the kernel's and falls back to wireguard-go; `kernel` and
    `userspace` insist. Raises NoWireGuard with the reason when none fits."""
    if setting == "kernel" or (setting == "auto" and kernel_has_wireguard):
        if not kernel_has_wireguard:
            raise NoWireGuard('wireguard = "kernel": this kernel has no WireGuard')
        return "kernel"
    if wireguard_go is None:
        why = "this kernel has no WireGuard and " if setting == "auto" else ""
        raise NoWireGuard(f"{why}wireguard-go is not installed (apt-get install wireguard-go)")
    return "userspace"


def describe(setting: Setting, kernel_has_wireguard: bool, wireguard_go: str | None) -> str:
    """One line for `segd preflight`."""
    try:
        path = choose(setting, kernel_has_wireguard, wireguard_go)
    except NoWireGuard as e:
        return f"none: {e}"
    if path == "kernel":
        return "kernel WireGuard"
    return f"userspace WireGuard ({wireguard_go})"
