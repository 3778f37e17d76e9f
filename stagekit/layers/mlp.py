"""The gated (SwiGLU) feed-forward block: down(silu(gate(x)) * up(x)), split over a TP group."""

from __future__ import annotations

import torch
from torch import nn

from stagekit.layers.activation import SiluAndMul
from stagekit.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from stagekit.parallel.group import GroupCoordinator


class GatedMLP(nn.Module):
    """gate/up column-parallel (one fused weight), down row-parallel: each rank holds
    ``intermediate_size / tp`` of the hidden units. The output is summed over the group,
    unless ``reduce_results=False`` (then the caller owns the one all-reduce)."""

    def __init__(self, hidden_size: int, intermediate_size: int, group: GroupCoordinator,
                 dtype: torch.dtype = torch.float32, reduce_results: bool = True) -> None:
        super().__init__()
        size = intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [size, size], group, dtype=dtype)
        self.down_proj = RowParallelLinear(size, hidden_size, group, dtype=dtype, reduce_results=reduce_results)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))
