"""Per-sequence KV storage for a stage's local layers.

Each sequence owns one tensor [num_layers, 2, kv_heads, capacity, head_dim] that grows by
doubling; a layer's keys for positions [0, L) are then a [kv_heads, L, head_dim] view with
contiguous rows, which attention reads without copying. This is the simple cache the step
protocol needs; a paged block cache replaces it behind the same ``append``/``free`` interface.
"""

from __future__ import annotations

import torch


class KVCache:
    """Invariant: ``lengths[seq]`` tokens of every local layer are valid for each live
    sequence; writes start at or before that length (recompute overwrites)."""

    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
        device: torch.device, capacity_tokens: int,
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.capacity_tokens = capacity_tokens
        self._store: dict[int, torch.Tensor] = {}
        self.lengths: dict[int, int] = {}

    @property
    def used_tokens(self) -> int:
        return sum(self.lengths.values())

    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def _ensure(self, seq_id: int, needed: int) -> torch.Tensor:
        buf = self._store.get(seq_id)
        if buf is not None and buf.shape[3] >= needed:
            return buf
        cap = max(needed, 16 if buf is None else 2 * buf.shape[3])
        new = torch.empty(
            self.num_layers, 2, self.num_kv_heads, cap, self.head_dim, dtype=self.dtype, device=self.device
        )
        if buf is not None:
            n = self.lengths.get(seq_id, 0)
            new[:, :, :, :n].copy_(buf[:, :, :, :n])
        self._store[seq_id] = new
        return new

    def append(
        self, layer: int, seq_id: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v ([n, kv_heads, head_dim]) at ``start`` and return this layer's
        keys/values for positions ``[0, start + n)``, each [kv_heads, start + n, head_dim]."""
        end = start + k.shape[0]
        if start > self.lengths.get(seq_id, 0):
            raise ValueError(f"seq {seq_id}: write at {start} past its cached {self.lengths.get(seq_id, 0)} tokens")
        buf = self._ensure(seq_id, end)
        buf[layer, 0, :, start:end] = k.transpose(0, 1)
        buf[layer, 1, :, start:end] = v.transpose(0, 1)
        self.lengths[seq_id] = max(self.lengths.get(seq_id, 0), end)
        return buf[layer, 0, :, :end], buf[layer, 1, :, :end]

    def read(self, seq_id: int, start: int, n: int) -> torch.Tensor:
        """Tokens ``[start, start+n)`` of every local layer: [num_layers, 2, kv_heads, n, head_dim] (a view)."""
        if self.lengths.get(seq_id, 0) < start + n:
            raise ValueError(f"seq {seq_id}: {start + n} tokens asked, {self.lengths.get(seq_id, 0)} cached")
        return self._store[seq_id][:, :, :, start:start + n]

    def write(self, seq_id: int, start: int, block: torch.Tensor) -> None:
        """Put ``block`` (as returned by ``read``) at ``start`` for every local layer."""
        end = start + block.shape[3]
        if start > self.lengths.get(seq_id, 0):
            raise ValueError(f"seq {seq_id}: write at {start} past its cached {self.lengths.get(seq_id, 0)} tokens")
        self._ensure(seq_id, end)[:, :, :, start:end] = block
        self.lengths[seq_id] = max(self.lengths.get(seq_id, 0), end)

    def free(self, seq_ids: list[int]) -> None:
        for s in seq_ids:
            self._store.pop(s, None)
            self.lengths.pop(s, None)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._store
