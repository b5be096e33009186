"""The container-label contract and the name patterns every part shares.

A container carries its pairing key and the labels it asks for as Docker
labels: `segd.pairing-key=<token>` and `segd.label.<dimension>=<value>`.
Whoever starts it (the orchestrator, `docker run --label`, compose) writes
them; the agent reads them. Labels under `segd.` prefixes are segd's own: a
configuration may not set them on containers. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

KEY_LABEL = "segd.pairing-key"
LABEL_PREFIX = "segd.label."
ORCH_PREFIX = "segd.orch."  # the orchestrator's own bookkeeping labels
RESERVED_PREFIXES = (KEY_LABEL, LABEL_PREFIX, ORCH_PREFIX)

# Names an admin gives (profiles, nodes, …): letters, digits, '_', '.', '-'.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
# Docker's container ids and names, network names and other references.
CONTAINER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}\Z")


def is_reserved(label: str) -> bool:
    """A Docker label only segd writes."""
    return label.startswith(RESERVED_PREFIXES)


def pairing_key(labels: Mapping[str, str]) -> str:
    """The pairing key a container carries ("" when none)."""
    return str(labels.get(KEY_LABEL) or "").strip()


def requested_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """dimension -> value of every `segd.label.*` label, sorted."""
    return {
        k[len(LABEL_PREFIX) :]: v
        for k, v in sorted(labels.items())
        if k.startswith(LABEL_PREFIX) and isinstance(v, str)
    }


def key_labels(key: str, labels: Mapping[str, str]) -> dict[str, str]:
    """The Docker labels that carry a pairing key and requested labels."""
    return {KEY_LABEL: key, **{LABEL_PREFIX + d: v for d, v in labels.items()}}
