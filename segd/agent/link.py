"""The agent's side of the server: pairing, unpairing, the instructions long-poll,
the sidecar list and tamper reports.

Every request is retried with one `Backoff` until the server answers; a wait is
cut short (with a random spread) once the long-poll sees the server again. What
the server says comes back to the agent as values (`PairAnswer`, signed
instructions); nothing here touches the kernel or the agent's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Container
from typing import Any, TypeVar

from segd import log
from segd.agent.client import Denied, PairAnswer, ServerClient, ServerUnavailable
from segd.agent.events import ContainerInfo
from segd.agent.retry import Backoff
from segd.wire import PairIn, SidecarIn, SignedInstructions

_log = log.get(__name__)

T = TypeVar("T")

# Refusals that can change by themselves: the IP is still held by a workload
# whose unpairing is on its way (the container that had it died moments ago).
TRANSIENT_DENIALS = frozenset({"ip_in_use"})

OnAnswer = Callable[[ContainerInfo, PairAnswer | Denied], Awaitable[None]]
OnInstructions = Callable[[SignedInstructions], Awaitable[None]]


class _Busy(Container[str]):
    def __init__(self, link: ServerLink) -> None:
        self._link = link

    def __contains__(self, cid: object) -> bool:
        return cid in self._link.pairing or cid in self._link.unpairing


class ServerLink:
    """Requests to the server on behalf of the agent, and their tasks."""

    def __init__(self, client: ServerClient, backoff_max: float) -> None:
        self.client = client
        self.backoff_max = backoff_max
        self.pairing: dict[str, asyncio.Task[None]] = {}
        self.unpairing: dict[str, asyncio.Task[None]] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self._back = asyncio.Event()  # set while the long-poll reaches the server
        self._away = asyncio.Event()  # set when a request found the server unreachable
        self._sidecars_changed = asyncio.Event()
        self._sidecars: Callable[[], list[SidecarIn]] = list

    # ---- requests, retried ---------------------------------------------------------------

    async def retry(self, op: Callable[[], Awaitable[T]], what: str, cid: str = "") -> T:
        """Run `op` until the server answers: unreachable, or refused for a reason
        that changes by itself (TRANSIENT_DENIALS), means try again later."""
        backoff = Backoff(self.backoff_max)
        while True:
            try:
                got = await op()
                self._away.clear()
                return got
            except ServerUnavailable as e:
                self._away.set()
                _log.warning("server.unavailable", op=what, container=cid[:12], error=str(e))
            except Denied as e:
                if e.code not in TRANSIENT_DENIALS:
                    raise
                _log.info("server.retry", op=what, container=cid[:12], code=e.code)
            # Wake early (with a random spread) once the long-poll sees the server again.
            await backoff.wait(self._back)

    def pair(self, info: ContainerInfo, on_answer: OnAnswer) -> None:
        """Pair a container in the background; `on_answer` gets the answer or refusal."""
        if info.id in self.pairing:
            return
        task = asyncio.create_task(self._pair(info, on_answer))
        self.pairing[info.id] = task
        task.add_done_callback(functools.partial(self._done, self.pairing, info.id, "pairing"))

    async def _pair(self, info: ContainerInfo, on_answer: OnAnswer) -> None:
        req = PairIn(
            container_id=info.id,
            pairing_key=info.pairing_key,
            ips=info.ips,
            name=info.name,
            requested_labels=info.requested_labels,
        )
        try:
            answer: PairAnswer | Denied = await self.retry(
                lambda: self.client.pair(req), "pair", info.id
            )
        except Denied as e:
            answer = e
        await on_answer(info, answer)

    @property
    def busy(self) -> Container[str]:
        """Containers with a pairing or an unpairing under way."""
        return _Busy(self)

    def cancel_pairing(self, cid: str) -> None:
        task = self.pairing.pop(cid, None)
        if task is not None:
            task.cancel()

    def unpair(self, cid: str, then: Callable[[str], None] | None = None) -> None:
        """Unpair a container in the background; `then(cid)` once the server answered."""
        if cid in self.unpairing:
            return
        task = asyncio.create_task(self._unpair(cid, then))
        self.unpairing[cid] = task
        task.add_done_callback(functools.partial(self._done, self.unpairing, cid, "unpairing"))

    async def _unpair(self, cid: str, then: Callable[[str], None] | None) -> None:
        try:
            await self.retry(lambda: self.client.unpair(cid), "unpair", cid)
            _log.info("workload.unpaired", container=cid[:12])
        except Denied as e:
            _log.warning("unpair.refused", container=cid[:12], error=e.message)
        self.unpairing.pop(cid, None)  # done: a pairing of the same container may start
        if then is not None:
            then(cid)

    async def unpairings_landed(self, within: float) -> None:
        """Wait up to `within` seconds for the unpairings under way; not at all once
        the server is found unreachable (they cannot land then)."""
        if not self.unpairing:
            return
        landed = asyncio.ensure_future(asyncio.wait(list(self.unpairing.values())))
        away = asyncio.ensure_future(self._away.wait())
        try:
            await asyncio.wait({landed, away}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            landed.cancel()
            away.cancel()

    @staticmethod
    def _done(
        tasks: dict[str, asyncio.Task[None]], cid: str, what: str, task: asyncio.Task[None]
    ) -> None:
        if tasks.get(cid) is task:
            del tasks[cid]
        if not task.cancelled() and task.exception() is not None:
            _log.error(f"{what}.failed", container=cid[:12], error=repr(task.exception()))

    def report(self, event: str, cid: str, detail: str) -> None:
        """Tell the server (audit), in the background; lost if it is away."""

        async def send() -> None:
            with contextlib.suppress(ServerUnavailable, Denied):
                await self.client.report(event, cid, detail)

        task = asyncio.create_task(send())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # ---- long-running loops --------------------------------------------------------------

    async def poll(self, since: Callable[[], int], on_instructions: OnInstructions) -> None:
        """Long-poll for instructions newer than `since()`; hand each to `on_instructions`."""
        backoff = Backoff(self.backoff_max)
        while True:
            try:
                signed = await self.client.instructions(since(), wait=25.0)
                backoff.reset()
                if not self._back.is_set():
                    _log.info("server.reachable")
                    self._back.set()
            except ServerUnavailable as e:
                if self._back.is_set():
                    self._back = asyncio.Event()
                _log.warning("server.unavailable", op="instructions", error=str(e))
                await backoff.wait()
                continue
            except Denied as e:
                _log.error("instructions.refused", code=e.code, error=e.message)
                await asyncio.sleep(self.backoff_max)
                continue
            except Exception as e:  # a bad answer must not stop enforcement
                _log.error("instructions.poll_failed", error=repr(e))
                await backoff.wait()
                continue
            if signed is not None:
                try:
                    await on_instructions(signed)
                except Exception as e:  # enforcement retries on the next reconcile
                    _log.error("instructions.apply_failed", error=repr(e))

    def sidecars_changed(self, current: Callable[[], list[SidecarIn]]) -> None:
        self._sidecars = current
        self._sidecars_changed.set()

    async def push_sidecars(self) -> None:
        """Keep the server's list of this host's sidecars (`workload list`) current:
        the whole list, whenever it changed, once the server takes it."""
        backoff = Backoff(self.backoff_max)
        sent: list[SidecarIn] | None = None
        while True:
            await self._sidecars_changed.wait()
            self._sidecars_changed.clear()
            items = self._sidecars()
            if items == sent:
                continue
            try:
                await self.client.sidecars(items)
            except ServerUnavailable as e:
                _log.warning("server.unavailable", op="sidecars", error=str(e))
                self._sidecars_changed.set()
                await backoff.wait(self._back)
                continue
            except Denied as e:  # told once; tried again when the list changes
                _log.warning("sidecars.refused", code=e.code, error=e.message)
            else:
                _log.info("sidecars.reported", sidecars=len(items))
            sent = items
            backoff.reset()

    async def close(self, drain: float = 5.0) -> None:
        """Let requests under way finish (up to `drain` seconds), then cancel the rest."""
        pending = [*self.pairing.values(), *self.unpairing.values(), *self._bg]
        if pending:
            _, still = await asyncio.wait(pending, timeout=drain)
            for t in still:
                t.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        await self.client.close()
