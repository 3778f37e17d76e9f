"""What one forward pass of a stage computes: which sequences, how many new tokens each,
where their KV lives. Passed explicitly to every layer that needs it (no hidden global)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stagekit.engine.kv_cache import KVCache


@dataclass(frozen=True, slots=True)
class SeqSlice:
    """Tokens ``[num_computed, num_computed + num_new)`` of sequence ``seq_id``."""

    seq_id: int
    num_computed: int
    num_new: int
    sample: bool = True


@dataclass(slots=True)
class ForwardBatch:
    """A flattened batch: the tokens of ``seqs`` are concatenated in order
    (hidden states are [num_tokens, hidden])."""

    seqs: list[SeqSlice]
    positions: torch.Tensor  # [num_tokens] int64
    kv_cache: KVCache

    @classmethod
    def build(cls, seqs: list[SeqSlice], kv_cache: KVCache, device: torch.device) -> ForwardBatch:
        positions = torch.cat(
            [torch.arange(s.num_computed, s.num_computed + s.num_new, dtype=torch.int64) for s in seqs]
        ) if seqs else torch.empty(0, dtype=torch.int64)
        return cls(seqs=seqs, positions=positions.to(device), kv_cache=kv_cache)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

    def sample_indices(self) -> torch.Tensor:
        """Index of the last token of every sequence that is sampled after this step."""
        idx, end = [], 0
        for s in self.seqs:
            end += s.num_new
            if s.sample:
                idx.append(end - 1)
        return torch.tensor(idx, dtype=torch.int64, device=self.positions.device)
