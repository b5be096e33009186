"""Apply the segd mesh on one bed host from a `wire.Mesh`, without a server: what
an agent's mesh part does with the mesh of its instructions. Run on the host
(`BedHost.run`): `python tests/bed/mesh_apply.py STATE_DIR DOCKER_URL key|MESH_JSON`.
Prints the host's WireGuard public key, or what was applied (JSON)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, cast

import msgspec

from segd import wire
from segd.agent.docker import DockerWatcher
from segd.agent.mesh import MeshAgent
from segd.config import AgentMeshConfig
from segd.firewall.kernel import Firewall
from segd.mesh import keys


async def main(state_dir: str, docker_url: str, what: str) -> None:
    if what == "key":
        print(keys.load_or_create(state_dir).public_b64)
        return
    mesh = msgspec.json.decode(what, type=wire.Mesh)
    cfg = AgentMeshConfig(enabled=True, wireguard="userspace")
    docker = DockerWatcher(docker_url)
    try:
        async with Firewall() as fw:
            agent = MeshAgent(cfg, state_dir, cast(Any, None), docker, fw, cast(Any, None))
            assert await agent.prepare()
            d = await agent.apply(mesh)
    finally:
        await docker.close()
    assert d is not None
    print(json.dumps({"bridge": d.local.bridge, "gateway": d.local.gateway, "peers": len(d.peers)}))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
