"""The importing head's side of a KV transfer: blocks reserved for KV arriving from
another replica, named by their prefix hashes once every stage holds them.

A reservation references its blocks (so nothing else is scheduled into them) while the
stages receive the data outside of any step; committing names them in the prefix cache
and drops the reference, so they become cached prefix blocks like any computed prompt's.
A reservation nobody commits (the exporter died) is released after ``ttl_s``.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from stagekit.engine.block_manager import BlockManager
from stagekit.errors import CapacityExceeded, InvalidRequest, NotFound


@dataclass(slots=True)
class Reservation:
    hashes: list[int]
    blocks: list[int]
    expires: float


class KvImports:
    """Invariant: every block of a pending reservation holds one reference from it."""

    def __init__(self, ttl_s: float = 120.0) -> None:
        self.ttl_s = ttl_s
        self._pending: dict[str, Reservation] = {}
        self._ids = itertools.count(1)
        self.imported_blocks = 0

    def reserve(self, bm: BlockManager, hashes: list[int], block_size: int,
                headroom: int = 0, ttl_s: float | None = None) -> tuple[str, int, list[int]]:
        """Blocks for ``hashes`` beyond the leading ones already cached: (id, present, blocks);
        the reservation expires after ``ttl_s`` (None: ``self.ttl_s``)."""
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
        self._pending[import_id] = Reservation(hashes[present:], blocks, time.monotonic() + ttl)
        return import_id, present, blocks

    def commit(self, bm: BlockManager, import_id: str, ok: bool) -> None:
        r = self._pending.pop(import_id, None)
        if r is None:
            raise NotFound(f"no pending KV import {import_id!r} (committed already, or expired)")
        if ok:
            for b, h in zip(r.blocks, r.hashes, strict=True):
                bm.register(b, h)
            self.imported_blocks += len(r.blocks)
        bm.release(r.blocks)

    def expire(self, bm: BlockManager) -> None:
        now = time.monotonic()
        for import_id in [k for k, r in self._pending.items() if r.expires < now]:
            bm.release(self._pending.pop(import_id).blocks)

    def forget(self) -> None:
        """The pool was replaced (re-wired with another size): reservations are void."""
        self._pending.clear()
