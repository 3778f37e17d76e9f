"""The replica head's allocator of KV blocks, with automatic prefix caching.

Every stage of a pipeline has a pool of (at least) ``num_blocks`` blocks; the head decides
which block ids each sequence uses and sends them with the steps, so one allocator serves
the whole pipeline. Blocks are reference counted: a full prompt block is named by the
chained hash of its tokens (stagekit/engine/prefix_cache.py) once every stage has written
it, and a later prompt with the same prefix takes the same block instead of recomputing
it. A block nobody references keeps its hash and stays reusable until the pool needs it:
such blocks are reclaimed least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockManager:
    """Invariant: each block is in exactly one of: referenced (``refs[b] > 0``), ``_free``
    (no hash), ``_cached`` (no references, still named by its hash, LRU order)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching and num_blocks > 0
        self.refs = [0] * num_blocks
        # a stack: the most recently released block is reused first (warm in cache, and the
        # pool's untouched pages stay untouched: resident memory follows peak use, not time)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._hash_of: dict[int, int] = {}     # block -> hash
        self._block_of: dict[int, int] = {}    # hash -> block
        self.query_tokens = 0
        self.hit_tokens = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or only cached)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks named by a prompt-prefix hash, referenced or not."""
        return len(self._block_of)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match(self, hashes: list[int]) -> list[int]:
        """The blocks holding the longest cached prefix of ``hashes`` (not yet referenced:
        call ``take``)."""
        out = []
        if self.prefix_caching:
            for h in hashes:
                b = self._block_of.get(h)
                if b is None:
                    break
                out.append(b)
        return out

    def count_query(self, num_prompt_tokens: int, num_hit_blocks: int) -> None:
        """Metrics: a prompt of ``num_prompt_tokens`` was looked up and found that many blocks."""
        self.query_tokens += num_prompt_tokens
        self.hit_tokens += num_hit_blocks * self.block_size

    def cost(self, cached: list[int], num_new: int) -> int:
        """Free blocks consumed by taking ``cached`` and allocating ``num_new`` more."""
        return num_new + sum(1 for b in cached if self.refs[b] == 0)

    def take(self, blocks: list[int]) -> None:
        """Reference cached blocks (a prefix hit)."""
        for b in blocks:
            if self.refs[b] == 0:
                del self._cached[b]
            self.refs[b] += 1

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks for one sequence; reclaims least recently used cached blocks when
        no free one is left. The caller checks ``num_free`` first."""
        if n > self.num_free:
            raise RuntimeError(f"{n} KV blocks asked, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._cached.popitem(last=False)
                del self._block_of[self._hash_of.pop(b)]
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block (a sequence finished or was preempted). The
        last blocks of a table are released first, so a prefix outlives its tails in LRU."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self._hash_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    def register(self, block: int, h: int) -> None:
        """Name a full prompt block (written on every stage) by its prefix hash. A hash
        already naming another block keeps that block: this one stays anonymous."""
        if not self.prefix_caching or h in self._block_of or block in self._hash_of:
            return
        self._block_of[h] = block
        self._hash_of[block] = h

    def forget_hashes(self) -> None:
        """Drop every prefix name (the pipeline's stages changed: their blocks are not ours
        to trust). Referenced blocks stay with their sequences."""
        for b in self._cached:
            self._free.append(b)
        self._cached.clear()
        self._hash_of.clear()
        self._block_of.clear()
