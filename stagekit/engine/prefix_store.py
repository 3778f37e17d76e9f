"""A stage's copy of the cached prefix blocks: one tensor per block holding its KV for the
stage's local layers. Driven only by the head's PrefixOps."""

from __future__ import annotations

import torch

from stagekit.engine.kv_cache import KVCache
from stagekit.engine.prefix_cache import BLOCK_SIZE, PrefixOps


class PrefixStore:
    """Invariant: holds exactly the blocks the head's index holds, if every command
    reached this stage in order."""

    def __init__(self, kv_cache: KVCache, memory_bytes: int, block_size: int = BLOCK_SIZE) -> None:
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.capacity_blocks = memory_bytes // (kv_cache.bytes_per_token() * block_size)
        self._blocks: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def apply_before_free(self, ops: PrefixOps) -> None:
        if ops.reset:
            self._blocks.clear()
        for h in ops.evict:
            self._blocks.pop(h, None)
        bs = self.block_size
        for seq_id, index, h in ops.save:
            self._blocks[h] = self.kv_cache.read(seq_id, index * bs, bs).clone()

    def apply_after_free(self, ops: PrefixOps) -> None:
        bs = self.block_size
        for seq_id, hashes in ops.load:
            for i, h in enumerate(hashes):
                self.kv_cache.write(seq_id, i * bs, self._blocks[h])
