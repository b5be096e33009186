"""Wire types shared by the server, the agent and `segd ctl` (msgspec Structs).

Every HTTP body and every file segd writes is one of these. Decoders are strict:
unknown fields and wrong types are refused.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from segd.policy import Labels, Selectors, Service

# Bounds of API input that the types state (`msgspec.Meta`): decoding refuses a
# value outside them (400 `invalid_input`) and the OpenAPI document shows them.
MAX_USES = 1_000_000
MAX_LIFESPAN_S = 10 * 366 * 86400
MAX_CODE_LIFESPAN_S = 30 * 86400
MAX_SERVICES = 64
MAX_IPS = 16
MAX_PAIRING_KEY = 4096
MAX_BLOCKS = 64

MaxUses = Annotated[int, msgspec.Meta(ge=1, le=MAX_USES)]
Lifespan = Annotated[int, msgspec.Meta(ge=1, le=MAX_LIFESPAN_S)]


class Error(msgspec.Struct, frozen=True):
    error: str
    message: str


class Health(msgspec.Struct, frozen=True, omit_defaults=True):
    """`GET /v1/health` of the server and of the orchestrator (which has no key)."""

    status: str
    version: str
    key_id: str = ""  # the id of the server key that signs keys and instructions


# ---- policy (admin API) -------------------------------------------------------------


IpBlocks = Annotated[
    list[str],
    msgspec.Meta(
        max_length=MAX_BLOCKS,
        description="address blocks (CIDR, IPv4 or IPv6, host bits zero) on this side",
    ),
]


class RuleIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A rule: `consumers` may reach `providers` on `services`. A side is label
    sets, address blocks (`*_ips`), or both; or `any`. With blocks, its label
    sets may be an empty list."""

    providers: Selectors
    consumers: Selectors
    services: Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_SERVICES)]
    options: list[str] = []
    description: str = ""
    provider_ips: IpBlocks = []
    consumer_ips: IpBlocks = []


class Rule(msgspec.Struct, frozen=True):
    id: str
    providers: Selectors
    consumers: Selectors
    services: list[str]
    options: list[str] = []
    description: str = ""
    created_at: float = 0.0
    provider_ips: list[str] = []
    consumer_ips: list[str] = []


OnMismatch = Literal["deny", "default"]
# How a paired workload's policy is applied: `full` enforces it; `visibility`
# evaluates it but accepts (and reports as potentially_blocked) what it would
# drop; `idle` installs no table (paired only). Unpaired containers are isolated
# in every mode.
Mode = Literal["full", "visibility", "idle"]
# What the agent reports of a workload's traffic.
VisibilityLevel = Literal["off", "blocked", "blocked+allowed", "enhanced"]


class ProfileIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    labels: Labels
    locked: list[str] = []
    max_uses: (
        Annotated[
            MaxUses, msgspec.Meta(description="new containers each key admits; null: unlimited")
        ]
        | None
    ) = None  # None: unlimited
    lifespan_s: Lifespan = 3600
    on_mismatch: OnMismatch = "deny"
    enabled: bool = True
    description: str = ""
    mode: Mode = "full"
    visibility: VisibilityLevel = "blocked"


class Profile(msgspec.Struct, frozen=True):
    id: str
    name: str
    labels: Labels
    locked: list[str]
    max_uses: int | None  # None: unlimited
    lifespan_s: int
    on_mismatch: OnMismatch
    enabled: bool
    description: str
    created_at: float
    mode: Mode = "full"
    visibility: VisibilityLevel = "blocked"


class ProfileModeIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`PUT /v1/profiles/{name}/mode`: the profile's mode and (when given) its
    visibility level; its workloads without a mode of their own follow."""

    mode: Mode
    visibility: VisibilityLevel | msgspec.UnsetType = msgspec.UNSET


class WorkloadModeIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`PUT /v1/workloads/{id}/mode`: the workload's own mode; null: its profile's."""

    mode: Mode | None


class KeyIssueIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    profile: str
    # absent: the profile's; null: unlimited
    max_uses: (
        Annotated[MaxUses, msgspec.Meta(description="absent: the profile's; null: unlimited")]
        | msgspec.UnsetType
        | None
    ) = msgspec.UNSET
    lifespan_s: Lifespan | None = None
    description: str = ""


class PairingKey(msgspec.Struct, frozen=True):
    key_id: str
    profile: str
    max_uses: int | None  # None: unlimited
    uses: int
    issued_at: float
    expires_at: float
    revoked: bool
    description: str


class KeyIssued(msgspec.Struct, frozen=True):
    key_id: str
    token: str
    expires_at: float
    max_uses: int | None


class RevokeIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Revoking a key or a profile; `unpair` also unpairs what it paired."""

    unpair: bool = False


class Sidecar(msgspec.Struct, frozen=True):
    """A container in a workload's network namespace (`--network container:X`):
    the workload's table is its table; it has no addresses of its own."""

    container_id: str
    name: str


class Workload(msgspec.Struct, frozen=True):
    id: str
    host_id: str
    container_id: str
    name: str
    labels: Labels
    ips: list[str]
    key_id: str
    paired_at: float
    sidecars: list[Sidecar] = []  # containers that share its network namespace
    mode: Mode = "full"  # in effect: the workload's own if set, else its profile's
    mode_override: Mode | None = None  # set by `workload set-mode`
    visibility: VisibilityLevel = "blocked"


MeshState = Literal["off", "pending", "up", "revoked"]


class Host(msgspec.Struct, frozen=True):
    id: str
    hostname: str
    public_key: str
    registered_at: float
    last_seen: float
    instructions_version: int
    revoked: bool
    workloads: int
    # the segd mesh (all empty / "off" for a host that is not in it)
    subnet: str = ""  # the host's mesh subnet, given by the server from its pool
    endpoint: str = ""  # "IP:PORT" of its WireGuard interface
    mesh_public_key: str = ""  # base64 X25519 (WireGuard) public key
    mesh: MeshState = "off"


class AuditEntry(msgspec.Struct, frozen=True):
    id: int
    at: float
    event: str
    result: str
    reason: str
    host_id: str = ""
    container_id: str = ""
    key_id: str = ""
    workload_id: str = ""
    detail: str = ""


class ActivationCode(msgspec.Struct, frozen=True):
    code: str
    expires_at: float


class ActivationCodeIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    lifespan_s: Annotated[int, msgspec.Meta(ge=1, le=MAX_CODE_LIFESPAN_S)] = 3600


class AdminToken(msgspec.Struct, frozen=True):
    token: str  # the new admin token; every other one is invalid
    token_file: str  # where the server wrote it (0600, in its data dir)


# ---- agent API ----------------------------------------------------------------------


class RegisterIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    activation_code: str
    public_key: str  # base64url Ed25519 verify key
    hostname: str


class Registered(msgspec.Struct, frozen=True):
    host_id: str
    server_keys: dict[str, str]  # key id -> base64url Ed25519 verify key


class PairIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    container_id: str
    pairing_key: Annotated[str, msgspec.Meta(max_length=MAX_PAIRING_KEY)]
    ips: Annotated[list[str], msgspec.Meta(max_length=MAX_IPS)]
    name: str = ""
    requested_labels: Labels = {}


class UnpairIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    container_id: str


class SidecarIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A container the agent does not enforce on its own: it is in the network
    namespace of the container `shares`, whose table applies to it."""

    container_id: str
    shares: str
    name: str = ""


class SidecarsIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every sidecar on the host now (replaces what the host said before)."""

    sidecars: list[SidecarIn]


class MeshJoinIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An agent joining the segd mesh (`PUT /v1/agent/mesh`): its WireGuard public
    key and the endpoint other hosts reach it at. Joining again updates both and
    keeps the subnet."""

    public_key: Annotated[str, msgspec.Meta(min_length=44, max_length=44)]  # base64, 32 bytes
    endpoint: Annotated[str, msgspec.Meta(max_length=64)]  # "IP:PORT", IPv6 as "[IP]:PORT"


class MeshJoined(msgspec.Struct, frozen=True):
    """The server's answer to a mesh join: the host's subnet (durable) and the pool."""

    subnet: str
    pool: str


class AgentReport(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Something the agent saw and the server should audit (tamper, errors)."""

    event: str
    container_id: str = ""
    detail: str = ""


# ---- management instructions --------------------------------------------------------


class Allow(msgspec.Struct, frozen=True, order=True):
    """One accept: a peer set (None = any address) on services, from a rule."""

    rule_id: str
    peer: str | None
    services: list[Service]


class WorkloadPolicy(msgspec.Struct, frozen=True, omit_defaults=True):
    """What one local workload may send (outbound) and receive (inbound)."""

    workload_id: str
    container_id: str
    labels: Labels
    ips: list[str]
    inbound: list[Allow]
    outbound: list[Allow]
    mode: Mode = "full"
    visibility: VisibilityLevel = "off"


class MeshPeer(msgspec.Struct, frozen=True, order=True):
    """Another mesh host this host exchanges traffic with: WireGuard peer
    `public_key` at `endpoint`, allowed IPs (and routes) = `subnet`."""

    host_id: str
    public_key: str
    endpoint: str
    subnet: str


class Mesh(msgspec.Struct, frozen=True):
    """This host's part of the segd mesh: its own subnet, the whole pool (traffic
    to or from the pool leaves and enters only through the mesh interface), and
    the peers it needs (hosts with workloads relevant to this host's)."""

    pool: str
    subnet: str
    peers: list[MeshPeer]


class Instructions(msgspec.Struct, frozen=True, omit_defaults=True):
    """Per-host management instructions: relevant rules and membership only."""

    host_id: str
    version: int
    workloads: list[WorkloadPolicy]
    sets: dict[str, list[str]]  # set name -> sorted IPs or CIDR blocks (v4 and v6)
    rules: list[Rule]
    mesh: Mesh | None = None  # None: this host is not in the segd mesh


class SignedInstructions(msgspec.Struct, frozen=True):
    """Instructions as signed bytes: `payload` is base64url of the JSON encoding."""

    key_id: str
    payload: str
    signature: str


class PairResult(msgspec.Struct, frozen=True):
    """A pairing's answer: the workload, its labels, and the host's instructions
    version once the pairing is durable. The long-poll, woken by the same commit,
    brings those instructions. Earlier servers answered with the host's signed
    `instructions` instead of a version; an agent accepts both answers."""

    workload_id: str
    labels: Labels
    version: int = 0
    instructions: SignedInstructions | msgspec.UnsetType = msgspec.UNSET


# ---- flows (agent -> server, and the flow API) ----------------------------------------

Direction = Literal["in", "out"]
Verdict = Literal["allowed", "blocked", "potentially_blocked"]
FlowProto = Literal["tcp", "udp", "icmp", "other"]
MAX_FLOW_BATCH = 5000
# A count an agent reports (connections, packets, bytes, records lost): at most
# the largest integer every JSON reader keeps exactly, and far inside SQLite's.
MAX_COUNT = 2**53 - 1
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]


class FlowRecordIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Traffic of one local container with one peer, aggregated over an interval.

    `direction` is seen from the local container; `port` is the server's port
    (the destination for `out`, the local port for `in`), never a client's
    ephemeral port; 0 for icmp. `workload_id` is empty when the container is not
    paired (the host gate dropped it); `peer_workload_id` is empty when the
    instructions do not know the peer's address (external)."""

    container_id: str
    direction: Direction
    peer_ip: str
    proto: FlowProto
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)]
    verdict: Verdict
    connections: Count
    first_seen: float
    last_seen: float
    workload_id: str = ""
    peer_workload_id: str = ""
    rule_id: str = ""
    packets: Count = 0
    bytes: Count = 0


class FlowBatchIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`POST /v1/agent/flows`: records since the last batch, how many records the
    agent had to drop (queue full, reader overrun) since the last batch, and the
    batch's name."""

    records: Annotated[list[FlowRecordIn], msgspec.Meta(max_length=MAX_FLOW_BATCH)]
    lost: Count = 0
    # The agent's name for this batch, the same each time it sends it again: a
    # batch the server already kept is answered 204 and not kept twice (an agent
    # that names none may see its records twice after a timeout).
    batch_id: Annotated[str, msgspec.Meta(max_length=64, pattern="^[A-Za-z0-9_-]*$")] = ""


class FlowEnd(msgspec.Struct, frozen=True, omit_defaults=True):
    """One end of a flow: a workload (id, labels, host), an unpaired container on
    a host, or an address outside segd (`kind` external)."""

    ip: str
    kind: Literal["workload", "unpaired", "external"]
    workload_id: str = ""
    labels: Labels = {}
    host_id: str = ""
    container_id: str = ""


class Flow(msgspec.Struct, frozen=True):
    """A flow as the server keeps it (`GET /v1/flows`, the stream, the export)."""

    id: int
    src: FlowEnd
    dst: FlowEnd
    proto: FlowProto
    port: int
    verdict: Verdict
    rule_id: str
    connections: int
    packets: int
    bytes: int
    first_seen: float
    last_seen: float
    reported_by: str  # host id


class FlowPage(msgspec.Struct, frozen=True):
    flows: list[Flow]
    next: str = ""  # cursor for the next page; empty at the end


class Explanation(msgspec.Struct, frozen=True, omit_defaults=True):
    """`GET /v1/explain`: what the dataplane does with `src` -> `dst` on a port,
    worked out from the server's model. `reason` is a code (`rule`, `no_rule`,
    `locked_label`, `src_unpaired`, `dst_unpaired`, `mode_idle`, `mode_visibility`,
    `host_local`, `same_workload`); `message` says it in words, `steps` the checks
    made on each side, in order."""

    verdict: Verdict
    reason: str
    message: str
    src: FlowEnd
    dst: FlowEnd
    proto: FlowProto
    port: int
    rule_id: str = ""  # the rule that allows it (both sides, when both are workloads)
    steps: list[str] = []
