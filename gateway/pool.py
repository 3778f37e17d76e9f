"""`ReplicaPool`: every replica of the served model, their health, admission and routing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from gateway.config import AdmissionLimits
from gateway.domain import StageInfo
from gateway.dp_groups import DpGroups
from gateway.metrics import GatewayMetrics
from gateway.replica import ReplicaClient
from gateway.roles import DECODES, role_label
from gateway.routing import PrefixIndex, RoundRobinRouter, Router
from stagekit.errors import CapacityExceeded, StageUnavailable

logger = logging.getLogger("stagemesh.gateway")


class StartupError(RuntimeError):
    """No replica became ready before the startup timeout."""


class Lease:
    """One request's slot on a replica; ``release`` (exactly once) gives it back."""

    def __init__(self, replica: ReplicaClient, tokens: int, matched_tokens: int = 0) -> None:
        self.replica = replica
        self.matched_tokens = matched_tokens  # prompt tokens the replica served before (PrefixIndex)
        self._tokens = tokens
        self._released = False

    def consume(self, num_tokens: int) -> None:
        """``num_tokens`` were generated: that much less is outstanding."""
        used = min(num_tokens, self._tokens)
        self._tokens -= used
        self.replica.gate.outstanding_tokens -= used

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.replica.gate.outstanding_tokens -= self._tokens
        self.replica.gate.release()


class ReplicaPool:
    """The replicas behind one gateway; requests go only to healthy ones with room.

    The pool serves once one replica is ready (`start`). A background loop probes every replica
    each ``health_interval_s``: a replica that stops answering is taken out, one that answers
    again (re-wired if a stage restarted) comes back, and one missing at start joins.
    Replicas of a DP-attention group serve together or not at all (`DpGroups`, re-evaluated on
    every probe and every health change once started). Replicas join (`add`) and leave
    (`remove`) while it serves (replica_admin.py); an index is never handed out twice.
    Admission: a request runs on a replica with a free slot if any has one, else waits in the
    line of one whose line is not full (and while the total waiting is under its limit), else
    it is refused with `CapacityExceeded` (429) at once. Routing picks among the replicas of
    the roles asked for: those that decode (``decode``, ``both``) unless a prefill/decode
    hand-off (``pd``, gateway/pd.py) asks for a prefill replica.
    """

    def __init__(
        self,
        replicas: Sequence[ReplicaClient],
        *,
        router: Router | None = None,
        health_interval_s: float = 5.0,
        admission: AdmissionLimits | None = None,
        prefix_index: PrefixIndex | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        if not replicas:
            raise ValueError("a gateway needs at least one replica")
        self.replicas = list(replicas)
        self.router: Router = router or RoundRobinRouter()
        self.health_interval_s = health_interval_s
        self.admission = admission or AdmissionLimits()
        self.prefix_index = prefix_index or PrefixIndex()
        self.metrics = metrics
        self.dp_groups = DpGroups(metrics)
        self.probe_listeners: list[Callable[[ReplicaPool], None]] = []
        self.pd: Any = None  # prefill/decode disaggregation (gateway/pd.py), when replicas have those roles
        self._health_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._issued = 0  # replica indices handed out: never reused, so an admin id names one replica for good
        for r in self.replicas:
            self._adopt(r)

    def _adopt(self, r: ReplicaClient) -> None:
        r.gate.max_running = self.admission.max_running_per_replica
        r.gate.max_waiting = self.admission.max_waiting_per_replica
        r.health_listeners.append(self._on_health_change)
        self._issued = max(self._issued, r.index + 1)

    def next_index(self) -> int:
        """An index no replica of this pool ever had."""
        self._issued += 1
        return self._issued - 1

    def get(self, index: int) -> ReplicaClient | None:
        return next((r for r in self.replicas if r.index == index), None)

    def add(self, replica: ReplicaClient) -> None:
        """Serve ``replica`` too once it is healthy (the caller or the health loop wires it)."""
        if self.get(replica.index) is not None:
            raise ValueError(f"replica {replica.index} is already in the pool")
        self._adopt(replica)
        self.replicas.append(replica)

    async def remove(self, replica: ReplicaClient) -> None:
        """Forget ``replica`` and close its channels; the caller drained it and moved its requests."""
        self.replicas.remove(replica)
        replica.gate.fail_waiters(StageUnavailable(f"replica {replica.index} was removed"))
        self.prefix_index.forget(replica.index)
        if self.metrics is not None:
            self.metrics.forget_replica(replica.index)
        if self._health_task is not None:
            self.dp_groups.update(self.replicas)
        await replica.close()

    @property
    def any_serving(self) -> bool:
        return any(r.serving for r in self.replicas)

    @property
    def num_waiting(self) -> int:
        return sum(r.gate.waiting for r in self.replicas)

    async def start(self, timeout_s: float) -> StageInfo:
        """Serve as soon as one replica is ready: wait up to ``timeout_s`` for the first, give the
        others one more try (replicas that come up together, like a DP group, start together),
        then start the health loop, which wires the missing ones when they answer. Returns the
        head info of the first ready replica; `StartupError` (naming every replica's last error)
        when none became ready in time."""
        tasks = [asyncio.create_task(r.wait_wired(timeout_s)) for r in self.replicas]
        try:
            await _first_success(tasks, timeout_s + 1.0)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        ready = [r for r in self.replicas if r.healthy and r.head_info is not None]
        if not ready:
            raise StartupError(
                f"no replica became ready within {timeout_s:g}s: "
                + "; ".join(f"replica {r.index}: {r.last_error or 'not ready'}" for r in self.replicas)
            )
        late = [r for r in self.replicas if not r.healthy]
        if late:
            await asyncio.gather(*(r.probe() for r in late))
        for r in self.replicas:
            if not r.healthy:
                logger.warning("replica %d not ready, serving without it until it is: %s", r.index, r.last_error)
        names = {r.head_info.model_name for r in self.replicas if r.healthy and r.head_info is not None}
        if len(names) > 1:
            logger.warning("replicas serve different models: %s", sorted(names))
        self.dp_groups.update(self.replicas)  # not while replicas came up one by one: no false alarms
        self._health_task = asyncio.create_task(self._health_loop())
        assert ready[0].head_info is not None
        return ready[0].head_info

    async def tokenizer_files(self) -> dict[str, bytes]:
        replica = next((r for r in self.replicas if r.healthy), self.replicas[0])
        return await replica.tokenizer_files()

    def has_other(self, exclude: set[int], roles: frozenset[str] = DECODES) -> bool:
        return any(r.serving and r.index not in exclude and r.role in roles for r in self.replicas)

    def choose(
        self, prompt_token_ids: Sequence[int], exclude: frozenset[int] = frozenset(), roles: frozenset[str] = DECODES
    ) -> tuple[ReplicaClient, int]:
        """Route a request to a replica of one of ``roles`` (no slot taken): the replica and the
        prompt tokens it served before; raises `StageUnavailable` or `CapacityExceeded`."""
        mine = [r for r in self.replicas if r.role in roles]
        healthy = [r for r in mine if r.serving and r.index not in exclude]
        if not healthy:
            held = sorted({why for r in mine if r.index not in exclude for why in (r.hold_reason, r.role_error) if why})
            raise StageUnavailable(f"no healthy {role_label(roles)}replica is available"
                                   + "".join(f" ({reason})" for reason in held))
        candidates = [r for r in healthy if r.gate.can_run_now]
        if not candidates and self.num_waiting < self.admission.max_waiting_total:
            candidates = [r for r in healthy if r.gate.can_queue]
        if not candidates:
            raise CapacityExceeded(
                f"all {len(healthy)} healthy replica(s) are at capacity "
                f"({sum(r.gate.running for r in healthy)} running, {self.num_waiting} waiting); retry later"
            )
        replica = self.router.pick(candidates, prompt_token_ids)
        assert isinstance(replica, ReplicaClient)
        return replica, self._record(replica, prompt_token_ids)

    async def acquire(
        self,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        exclude: frozenset[int] = frozenset(),
        roles: frozenset[str] = DECODES,
    ) -> Lease:
        """A slot on a routed replica of one of ``roles``, waiting in its line if needed; a
        replica that goes down while the request waits is left for another one."""
        skip = set(exclude)
        tokens = len(prompt_token_ids) + max_tokens
        while True:
            replica, matched = self.choose(prompt_token_ids, frozenset(skip), roles)
            replica.gate.outstanding_tokens += tokens
            try:
                await replica.gate.acquire()
            except StageUnavailable:
                replica.gate.outstanding_tokens -= tokens
                skip.add(replica.index)
                continue
            except BaseException:
                replica.gate.outstanding_tokens -= tokens
                raise
            return Lease(replica, tokens, matched)

    def _record(self, replica: ReplicaClient, prompt_token_ids: Sequence[int]) -> int:
        """Index the prompt under the chosen replica; count the decision and any prefix hit.
        Returns the prompt tokens the index matched on the replica before."""
        hashes = self.prefix_index.block_hashes(prompt_token_ids)
        matched = self.prefix_index.matched_tokens(replica.index, hashes)
        self.prefix_index.insert(replica.index, hashes)
        if self.metrics is not None:
            self.metrics.record_route(self.router.policy, replica.index, len(prompt_token_ids), matched)
        return matched

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` detached (e.g. an Abort while the caller is being cancelled)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def snapshot(self) -> list[dict[str, Any]]:
        out = []
        for r in self.replicas:
            info = r.head_info
            group = self.dp_groups.group_of(r.index)
            out.append(
                {
                    "id": r.id,
                    "index": r.index,
                    "addresses": list(r.addresses),
                    "role": r.role,
                    "healthy": r.serving,  # what routing sees: a member of a down DP group is out too
                    "state": r.state,
                    "running": r.gate.running,
                    "waiting": r.gate.waiting,
                    "outstanding_tokens": r.gate.outstanding_tokens,
                    "stage_num_running": info.num_running if info else None,
                    "stage_num_waiting": info.num_waiting if info else None,
                    "stage_prefix_hit_tokens": info.prefix_hit_tokens if info else None,
                    "stage_prefix_query_tokens": info.prefix_query_tokens if info else None,
                    "last_error": r.last_error or r.hold_reason or r.role_error,
                    "dp_group": group.name if group else None,
                    "dp_rank": group.members[r.index] if group else None,
                    "origin": r.origin,
                    "active_requests": r.active_requests,
                    "moe": r.moe_summary(),
                }
            )
        return out

    def _on_health_change(self, replica: ReplicaClient) -> None:
        if not replica.healthy:
            self.prefix_index.forget(replica.index)  # its KV (and so its prefixes) may be gone
        if self._health_task is not None:
            self.dp_groups.update(self.replicas)
        for listener in self.probe_listeners:
            listener(self)

    async def probe_all(self) -> None:
        # a replica under an admin operation is the operation's to wire and mark
        await asyncio.gather(*(r.probe() for r in list(self.replicas) if r.busy is None))
        self.dp_groups.update(self.replicas)
        for listener in self.probe_listeners:
            listener(self)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.probe_all()
            except Exception:  # the loop must outlive any one bad probe
                logger.exception("health probe failed")

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._background:
            await asyncio.wait(list(self._background), timeout=2.0)
        await asyncio.gather(*(r.close() for r in self.replicas))


async def _first_success(tasks: Sequence[asyncio.Task[Any]], timeout_s: float) -> None:
    """Return once one of ``tasks`` succeeded, all of them ended, or ``timeout_s`` passed."""
    pending = set(tasks)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while pending:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return
        done, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if any(not task.cancelled() and task.exception() is None for task in done):
            return
