"""What the kernel module raises (re-exported by `segd.firewall.kernel`)."""

from __future__ import annotations


class NftError(Exception):
    """nft refused a script; the message is nft's own error text."""


class NetnsError(Exception):
    """A namespace could not be entered or left."""


class NamespaceGone(NetnsError):
    """The namespace path does not exist (the container is gone)."""


class HostNamespace(NetnsError):
    """A container's namespace path leads into the host's own namespace."""


class WorkerBroken(NetnsError):
    """The worker thread could not return home; it runs nothing more."""
