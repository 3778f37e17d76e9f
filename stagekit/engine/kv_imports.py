"""The importing head's side of a KV transfer: blocks reserved for KV arriving from
another replica, named by their prefix hashes once every stage holds them.

A reservation references its blocks (so nothing else is scheduled into them) while the
stages receive the data outside of any step; committing names them in the prefix cache
and drops the reference, so they become cached prefix blocks like any computed prompt's.
A reservation nobody commits (the exporter died) lapses after ``ttl_s``.

A lapsed or abandoned reservation's blocks are quarantined, not freed: a stage may still be
landing KV into them (a stalled sender resumes). Every stage writes its pool only before the
reservation's *land-by* time (its lease's end, wall clock, carried to the receivers with the
data), so the blocks go back to the free pool ``grace_s`` after it, once no write can land.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from stagekit.engine.block_manager import BlockManager
from stagekit.errors import CapacityExceeded, InvalidRequest, NotFound


@dataclass(slots=True)
class Reservation:
    hashes: list[int]
    blocks: list[int]
    expires: float                   # time.monotonic()
    land_by: float                   # the same moment, time.time(): what the stages compare with
    release_at: float = field(default=0.0)   # in quarantine: back to the free pool then (monotonic)


# How long after a reservation's land-by time its blocks stay quarantined: a write a stage
# began just before it, and clocks of different hosts disagreeing by up to about this much.
LAND_GRACE_S = 2.0


class KvImports:
    """Invariant: every block of a pending or quarantined reservation holds one reference
    from it; a quarantined one's blocks are released only ``grace_s`` after its land-by time."""

    def __init__(self, ttl_s: float = 120.0, grace_s: float = LAND_GRACE_S) -> None:
        self.ttl_s, self.grace_s = ttl_s, grace_s
        self._pending: dict[str, Reservation] = {}
        self._quarantine: list[Reservation] = []
        self._ids = itertools.count(1)
        self.imported_blocks = 0

    def reserve(self, bm: BlockManager, hashes: list[int], block_size: int,
                headroom: int = 0, ttl_s: float | None = None) -> tuple[str, int, list[int], float]:
        """Blocks for ``hashes`` beyond the leading ones already cached: (id, present, blocks,
        land-by time as ``time.time()``); the reservation expires after ``ttl_s`` (None:
        ``self.ttl_s``), its land-by time with it."""
        self.expire(bm)
        if block_size != bm.block_size:
            raise InvalidRequest(f"KV blocks of {block_size} tokens cannot be imported into blocks of "
                                 f"{bm.block_size}")
        if not bm.prefix_caching:
            raise InvalidRequest("prefix caching is off on this replica: imported KV could not be used")
        present = len(bm.match(hashes))
        need = len(hashes) - present
        if need > bm.num_free - headroom:
            raise CapacityExceeded(f"{need} KV blocks needed for the import, {max(0, bm.num_free - headroom)} free")
        blocks = bm.allocate(need)
        import_id = f"kv-import-{next(self._ids)}"
        ttl = self.ttl_s if ttl_s is None else ttl_s
        r = Reservation(hashes[present:], blocks, time.monotonic() + ttl, time.time() + ttl)
        self._pending[import_id] = r
        return import_id, present, blocks, r.land_by

    def commit(self, bm: BlockManager, import_id: str, ok: bool) -> None:
        r = self._pending.pop(import_id, None)
        if r is None:
            raise NotFound(f"no pending KV import {import_id!r} (committed already, or expired)")
        if not ok:   # another stage may still be landing into them
            self._quarantine_(r)
            return
        for b, h in zip(r.blocks, r.hashes, strict=True):
            bm.register(b, h)
        self.imported_blocks += len(r.blocks)
        bm.release(r.blocks)

    def expire(self, bm: BlockManager) -> None:
        """Quarantine the reservations past their lease; free the quarantined blocks past their grace."""
        now = time.monotonic()
        for import_id in [k for k, r in self._pending.items() if r.expires < now]:
            self._quarantine_(self._pending.pop(import_id))
        for r in [r for r in self._quarantine if r.release_at <= now]:
            self._quarantine.remove(r)
            bm.release(r.blocks)

    @property
    def quarantined_blocks(self) -> int:
        return sum(len(r.blocks) for r in self._quarantine)

    def _quarantine_(self, r: Reservation) -> None:
        r.release_at = r.expires + self.grace_s
        self._quarantine.append(r)

    def forget(self) -> None:
        """The pool was replaced (re-wired with another size): reservations are void."""
        self._pending.clear()
        self._quarantine.clear()
