"""Automatic prefix caching.

Full blocks of ``BLOCK_SIZE`` prompt tokens are named by a chained hash (a block's hash
covers every token before it), so equal hashes mean equal KV. The replica head owns the
index — which blocks are cached, LRU order, capacity — and tells every stage what to do in
the step header (``PrefixOps``): evict these blocks, save these blocks of a sequence's KV,
load these blocks into a new sequence. Every stage applies the same commands in the same
order, so their stores stay identical without any coordination of their own.

Stores keep a copy of each cached block; a hit copies the blocks into the new sequence's
KV (a memcpy) instead of recomputing the prefill.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

BLOCK_SIZE = 16


def block_hashes(token_ids: list[int], block_size: int = BLOCK_SIZE) -> list[int]:
    """Chained 63-bit hashes of every full block of ``token_ids``."""
    out, parent = [], b""
    for i in range(len(token_ids) // block_size):
        h = hashlib.blake2b(parent, digest_size=8)
        h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in token_ids[i * block_size:(i + 1) * block_size]))
        parent = h.digest()
        out.append(int.from_bytes(parent, "little") >> 1)
    return out


@dataclass(slots=True)
class PrefixOps:
    """Commands for every stage's prefix store, applied in this order: reset (drop every
    block: the head's index was rebuilt, e.g. after re-wiring), evict, save, then (after the
    step's frees) load."""

    reset: bool = False
    evict: list[int] = field(default_factory=list)
    save: list[tuple[int, int, int]] = field(default_factory=list)  # (seq_id, block index, hash)
    load: list[tuple[int, list[int]]] = field(default_factory=list)  # (seq_id, hashes of blocks 0..n-1)

    def __bool__(self) -> bool:
        return bool(self.reset or self.evict or self.save or self.load)


class PrefixIndex:
    """Head-side index of cached blocks with LRU eviction at ``capacity_blocks``."""

    def __init__(self, capacity_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.query_tokens = 0
        self.hit_tokens = 0

    @property
    def enabled(self) -> bool:
        return self.capacity_blocks > 0

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, hashes: list[int], num_prompt_tokens: int) -> int:
        """How many leading blocks are cached (marked recently used); counts the query."""
        self.query_tokens += num_prompt_tokens
        n = 0
        for h in hashes:
            if h not in self._lru:
                break
            self._lru.move_to_end(h)
            n += 1
        self.hit_tokens += n * self.block_size
        return n

    def insert(self, h: int) -> list[int] | None:
        """Add block ``h``; returns the blocks evicted to make room, or None if it was cached."""
        if h in self._lru:
            self._lru.move_to_end(h)
            return None
        evicted = []
        while len(self._lru) >= self.capacity_blocks:
            evicted.append(self._lru.popitem(last=False)[0])
        self._lru[h] = None
        return evicted
