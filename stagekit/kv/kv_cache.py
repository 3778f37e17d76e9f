"""A stage's paged KV cache: one pool of fixed-size blocks for its local layers.

The pool is a tensor [num_layers, 2, num_blocks, kv_heads, block_size, head_dim]; a layer's
keys are then a [num_blocks, kv_heads, block_size, head_dim] view, and token t of a
sequence lives in block ``table[t // block_size]`` at row ``t % block_size``. Within a
block each KV head's rows are contiguous: decode attention streams them (4 KiB runs at
16 x 64 fp32) instead of reading every kv_heads-th row. The replica
head picks the block ids (stagekit/engine/block_manager.py) and sends each sequence's new
blocks with the step, so every stage of the pipeline holds the same tables over pools of
the same block count; this class only keeps the tables and the memory.
"""

from __future__ import annotations

import torch

from stagekit.types.step import SeqSlice


def available_memory(device: torch.device, ranks_sharing_host: int = 1) -> int:
    """Bytes a rank may use now: free device memory on CUDA; on the CPU the host's
    MemAvailable split evenly over the stage's ranks (they share it)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // max(1, ranks_sharing_host)
    except OSError:
        pass
    return 1 << 30


def block_runs(blocks: list[int]) -> list[tuple[int, int, int]]:
    """``blocks`` as runs of consecutive ids: (position in ``blocks``, first block, length)."""
    out: list[tuple[int, int, int]] = []
    for i, b in enumerate(blocks):
        if out and out[-1][1] + out[-1][2] == b:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((i, b, 1))
    return out


class PagedKVCache:
    """Invariant: every id in ``tables`` is in [0, num_blocks); a sequence's table covers
    all tokens any step has written for it."""

    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
        device: torch.device, num_blocks: int, block_size: int, prefault: bool = False,
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        # untouched pages of a large host allocation are not resident until written: stages on one
        # host share its memory lazily, but a block's first write then page-faults (a KV import into
        # fresh blocks ran at a third of the speed); ``prefault`` zero-fills the pool up front
        shape = (num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim)
        self.kv = (torch.zeros if prefault else torch.empty)(shape, dtype=dtype, device=device)
        self.tables: dict[int, list[int]] = {}

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                        block_size: int) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def used_tokens(self) -> int:
        """Tokens in the blocks live sequences reference (shared blocks counted once)."""
        return len({b for t in list(self.tables.values()) for b in t}) * self.block_size

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of local layer ``index``: [num_blocks, kv_heads, block_size, head_dim] each."""
        return self.kv[index, 0], self.kv[index, 1]

    def apply(self, seqs: list[SeqSlice], freed: list[int], preempted: list[int]) -> None:
        """Drop the tables of freed and preempted sequences, then extend the step's tables."""
        for s in (*freed, *preempted):
            self.tables.pop(s, None)
        for s in seqs:
            bad = [b for b in s.new_blocks if not 0 <= b < self.num_blocks]
            if bad:
                raise ValueError(f"seq {s.seq_id}: block {bad[0]} is outside this stage's pool of "
                                 f"{self.num_blocks} blocks")
            table = self.tables.setdefault(s.seq_id, [])
            table.extend(s.new_blocks)
            if len(table) * self.block_size < s.num_computed + s.num_new:
                raise ValueError(f"seq {s.seq_id}: {len(table)} blocks cannot hold "
                                 f"{s.num_computed + s.num_new} tokens")

    def read_blocks(self, blocks: list[int]) -> torch.Tensor:
        """A copy of the KV of ``blocks``: [layers, 2, n, kv_heads, block_size, head_dim] on the pool's device."""
        out = torch.empty((*self.kv.shape[:2], len(blocks), *self.kv.shape[3:]), dtype=self.dtype, device=self.device)
        for i, b, n in block_runs(blocks):   # strided copies of runs: several times faster than index_select
            out[:, :, i:i + n].copy_(self.kv[:, :, b:b + n])
        return out

    def write_blocks(self, blocks: list[int], data: torch.Tensor) -> None:
        """Write ``data`` ([layers, 2, n, kv_heads, block_size, head_dim]) into ``blocks``."""
        for i, b, n in block_runs(blocks):   # index_put on dim 2 was several times slower
            self.kv[:, :, b:b + n].copy_(data[:, :, i:i + n])

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self.tables
