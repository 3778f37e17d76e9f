"""The prefill side of a prefill/decode hand-off: a finished request's prompt blocks, kept
pinned under a lease until the hand-off's export ends or the lease runs out.

A prefill replica runs a hand-off's request to its first token (`GenerateRequest.kv_hold_ms`);
its prompt's full blocks are then only cached, and a busy replica could reclaim them before
the gateway's ExportKv reads them. A hold takes a reference on them (the blocks stay in the
pool, in no sequence's table) until an ExportKv naming the hold ends, successfully or not,
or the lease expires, whichever comes first; the lease is the bound on what a gateway that
went away, or a decode replica that never answered, can keep pinned here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from stagekit.engine.engine import Engine

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Hold:
    blocks: list[int]
    timer: asyncio.TimerHandle
    generation: int   # the engine's pool the blocks belong to


class KvHolds:
    """Invariant: each hold owns one reference on each of its blocks, dropped exactly once (by
    `release` or by its lease's timer), after which the hold is gone from the table."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._holds: dict[str, _Hold] = {}
        self.expired = 0   # holds whose lease ran out before an export released them

    def __len__(self) -> int:
        return len(self._holds)

    def hold(self, hold_id: str, token_ids: list[int], lease_s: float) -> int:
        """Pin the cached full blocks of ``token_ids`` for up to ``lease_s``; returns how many.
        A second hold under the same id replaces the first."""
        self.release(hold_id)
        _, blocks = self.engine.pin_cached_prefix(token_ids)
        timer = asyncio.get_running_loop().call_later(lease_s, self._expire, hold_id)
        self._holds[hold_id] = _Hold(blocks, timer, self.engine.kv_pool_generation)
        return len(blocks)

    def release(self, hold_id: str) -> bool:
        """Drop the hold's pins now; False when there is none (released already, or expired)."""
        held = self._holds.pop(hold_id, None)
        if held is None:
            return False
        held.timer.cancel()
        if held.generation == self.engine.kv_pool_generation:   # else the pool they pinned is gone
            self.engine.unpin(held.blocks)
        return True

    def _expire(self, hold_id: str) -> None:
        held = self._holds.get(hold_id)
        if held is None:
            return
        self.expired += 1
        log.warning("KV hand-off %s: lease ran out before its export, releasing %d held block(s)", hold_id,
                    len(held.blocks))
        self.release(hold_id)

    def clear(self) -> None:
        for hold_id in list(self._holds):
            self.release(hold_id)
