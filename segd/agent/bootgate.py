"""The host gate at boot, before Docker starts a container (`segd boot-gate`).

The gate and every namespace's table are kernel state: a reboot clears them,
and Docker starts the containers that have a restart policy before the agent
runs. The unit `segd-gate.service`, ordered before `docker.service`, runs
`segd boot-gate`, which loads the gate with nothing admitted and every
destination guarded: each container is dark from its first packet until the
agent, once its table is in place, admits it (the agent's first rebuild of
the gate sets Docker's subnets). A gate already there (the agent is running,
or ran since the boot) is left as it is.
"""

from __future__ import annotations

from segd import log
from segd.firewall.gate import render_gate
from segd.firewall.kernel import Firewall
from segd.firewall.plan import Plan

_log = log.get(__name__)

BOOT_SUBNETS = ("0.0.0.0/0", "::/0")  # every destination behind a container port


def boot_plan() -> Plan:
    """The gate with nothing admitted and every destination guarded."""
    return render_gate((), BOOT_SUBNETS)


async def load(gate_ns: str | None = None) -> bool:
    """Load the boot gate unless a gate is there; whether it was loaded."""
    async with Firewall(gate_ns=gate_ns) as fw:
        if await fw.gate_list() is not None:
            _log.info("gate.boot_kept", reason="a gate is in place")
            return False
        await fw.gate_apply(boot_plan())
    _log.info("gate.boot_loaded")
    return True
