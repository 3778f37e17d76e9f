"""`ReplicaPool`: every replica of the served model, their health, and the routing policy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

from gateway.domain import StageInfo
from gateway.errors import Unavailable
from gateway.replica import ReplicaClient
from gateway.router import RoundRobinRouter, Router

logger = logging.getLogger("stagemesh.gateway")


class StartupError(RuntimeError):
    """No replica became ready before the startup timeout."""


class ReplicaPool:
    """The replicas behind one gateway; requests go only to healthy ones.

    A background loop probes every replica each ``health_interval_s``: a replica that stops
    answering is taken out, one that answers again (re-wired if a stage restarted) comes back.
    """

    def __init__(
        self,
        replicas: Sequence[ReplicaClient],
        *,
        router: Router | None = None,
        health_interval_s: float = 5.0,
    ) -> None:
        if not replicas:
            raise ValueError("a gateway needs at least one replica")
        self.replicas = list(replicas)
        self.router: Router = router or RoundRobinRouter()
        self.health_interval_s = health_interval_s
        self._health_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def any_healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    async def start(self, timeout_s: float) -> StageInfo:
        """Wire every replica (waiting up to ``timeout_s`` for their stages); the head info of the first."""
        tasks = [asyncio.create_task(r.wait_wired(timeout_s)) for r in self.replicas]
        await asyncio.wait(tasks, timeout=timeout_s + 1.0)
        for replica, task in zip(self.replicas, tasks, strict=True):
            if not task.done():
                task.cancel()
            elif task.exception() is not None:
                logger.warning("replica %d not ready: %s", replica.index, task.exception())
        await asyncio.gather(*tasks, return_exceptions=True)
        ready = [r for r in self.replicas if r.healthy and r.head_info is not None]
        if not ready:
            raise StartupError(
                f"no replica became ready within {timeout_s:g}s: "
                + "; ".join(f"replica {r.index}: {r.last_error}" for r in self.replicas)
            )
        names = {r.head_info.model_name for r in ready if r.head_info is not None}
        if len(names) > 1:
            logger.warning("replicas serve different models: %s", sorted(names))
        self._health_task = asyncio.create_task(self._health_loop())
        assert ready[0].head_info is not None
        return ready[0].head_info

    async def tokenizer_files(self) -> dict[str, bytes]:
        return await self.pick().tokenizer_files()

    def pick(self, prompt_token_ids: Sequence[int] = (), exclude: frozenset[int] = frozenset()) -> ReplicaClient:
        candidates = [r for r in self.replicas if r.healthy and r.index not in exclude]
        if not candidates:
            raise Unavailable("no healthy replica is available")
        return self.router.pick(candidates, prompt_token_ids)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` detached (e.g. an Abort while the caller is being cancelled)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def snapshot(self) -> list[dict[str, Any]]:
        out = []
        for r in self.replicas:
            info = r.head_info
            out.append(
                {
                    "index": r.index,
                    "addresses": list(r.addresses),
                    "healthy": r.healthy,
                    "in_flight": r.num_in_flight,
                    "num_running": info.num_running if info else None,
                    "num_waiting": info.num_waiting if info else None,
                    "last_error": r.last_error,
                }
            )
        return out

    async def probe_all(self) -> None:
        await asyncio.gather(*(r.probe() for r in self.replicas))

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
