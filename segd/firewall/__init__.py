"""Enforcement: ruleset rendering (pure) and nftables application in namespaces.

`render` and `gate` turn instructions into nft script text and never do I/O;
`applier.Firewall` is the only code that enters namespaces or talks to nftables.
"""

from segd.firewall.applier import Firewall, NsRef
from segd.firewall.gate import GateEntry
from segd.firewall.netns import NamespaceGone, NetnsError, WorkerBroken
from segd.firewall.nft import NftError

__all__ = [
    "Firewall",
    "GateEntry",
    "NamespaceGone",
    "NetnsError",
    "NftError",
    "NsRef",
    "WorkerBroken",
]
