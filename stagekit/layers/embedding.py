"""Vocab-parallel embedding and LM head.

The vocabulary is split into ``tp_size`` contiguous ranges of ``ceil(V / tp)`` rows (the
last padded with zero rows). Embedding: each rank looks up the ids that fall in its range,
zeros the rest, and one all-reduce assembles the rows. LM head: each rank computes the
logits of its range and one all-gather concatenates them (padding trimmed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stagekit.layers.cpu_packed import PackedWeight
from stagekit.layers.weight_source import WeightSource, copy_checked
from stagekit.parallel.group import GroupCoordinator


class VocabParallelEmbedding(nn.Module):
    """Holds vocabulary rows ``[vocab_start, vocab_end)`` (padded to ``num_per_partition``)."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, group: GroupCoordinator,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.group = group
        self.num_embeddings = num_embeddings
        self.num_per_partition = -(-num_embeddings // group.world_size)
        self.vocab_start = group.rank_in_group * self.num_per_partition
        self.vocab_end = min(num_embeddings, self.vocab_start + self.num_per_partition)
        self.weight = nn.Parameter(
            torch.zeros(self.num_per_partition, embedding_dim, dtype=dtype, device=group.device),
            requires_grad=False,
        )
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, src: WeightSource, shard_id: object = None) -> None:
        if src.shape[0] != self.num_embeddings:
            raise ValueError(f"vocab rows: checkpoint has {src.shape[0]}, config says {self.num_embeddings}")
        n = self.vocab_end - self.vocab_start
        copy_checked(param.data.narrow(0, 0, n), src.narrow(0, self.vocab_start, n), "vocab shard")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = (input_ids - self.vocab_start) * in_range
        out = F.embedding(local_ids, self.weight)
        out.mul_(in_range.unsqueeze(-1).to(out.dtype))
        return self.group.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding, PackedWeight):
    """The output projection, split over the vocabulary like the embedding."""

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # [T, hidden] -> [T, vocab]
        logits = self.matmul(hidden_states)
        logits = self.group.all_gather(logits, dim=-1)
        return logits[..., : self.num_embeddings]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.compute_logits(hidden_states)
