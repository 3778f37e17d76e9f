"""Column- and row-parallel linear layers.

For Y = X A + b with A of shape [in, out] (stored as torch's [out, in] weight):
- ColumnParallelLinear splits A by columns, A = [A_1 ... A_p]; rank i computes
  Y_i = X A_i + b_i and keeps its slice of the output (no collective).
- RowParallelLinear splits A by rows, A = [A_1; ...; A_p], and takes the input already
  split along its last dim; rank i computes X_i A_i and the results are summed with one
  all-reduce; the bias is added once, after the sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stagekit.layers.cpu_packed import PackedWeight
from stagekit.layers.weight_source import WeightSource, copy_checked, default_weight_loader
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.kv_heads import kv_heads_of


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}: {n} is not divisible by tp size {d}")
    return n // d


class ColumnParallelLinear(PackedWeight):
    """Holds rows ``[rank*out/p, (rank+1)*out/p)`` of the [out, in] weight."""

    def __init__(
        self, input_size: int, output_size: int, group: GroupCoordinator, bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.group = group
        self.input_size = input_size
        self.output_size_per_partition = divide(output_size, group.world_size, "column-parallel output")
        self.weight = nn.Parameter(
            torch.empty(self.output_size_per_partition, input_size, dtype=dtype, device=group.device),
            requires_grad=False,
        )
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(
                torch.empty(self.output_size_per_partition, dtype=dtype, device=group.device),
                requires_grad=False,
            )
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, src: WeightSource, shard_id: object = None) -> None:
        n = self.output_size_per_partition
        copy_checked(param, src.narrow(0, self.group.rank_in_group * n, n), "column-parallel shard")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs fused in one weight (e.g. gate and up projections);
    each rank's weight is [shard_0 | shard_1 | ...] of its slice of every output."""

    def __init__(
        self, input_size: int, output_sizes: list[int], group: GroupCoordinator, bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), group, bias, dtype)

    def weight_loader(self, param: nn.Parameter, src: WeightSource, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        tp = self.group.world_size
        size = divide(self.output_sizes[shard_id], tp, "merged column-parallel shard")
        offset = sum(self.output_sizes[:shard_id]) // tp
        loaded = src.narrow(0, self.group.rank_in_group * size, size)
        copy_checked(param.data.narrow(0, offset, size), loaded, f"merged shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection. Query heads are split over ranks; KV heads are split when
    there are at least as many as ranks, and replicated when fewer (``parallel/kv_heads.py``)."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
        group: GroupCoordinator, bias: bool = False, dtype: torch.dtype = torch.float32,
    ) -> None:
        tp = group.world_size
        self.head_dim = head_dim
        self.num_heads = divide(num_heads, tp, "attention heads")
        self.num_kv_heads = max(1, num_kv_heads // tp)
        self.total_num_kv_heads = num_kv_heads
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, group, bias, dtype)

    def weight_loader(self, param: nn.Parameter, src: WeightSource, shard_id: object = None) -> None:
        rank, tp, d = self.group.rank_in_group, self.group.world_size, self.head_dim
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            offset, size, start = 0, q_size, rank * q_size
        else:
            kv_head = kv_heads_of(rank, tp, self.total_num_kv_heads).start
            offset = q_size if shard_id == "k" else q_size + kv_size
            size, start = kv_size, kv_head * d
        copy_checked(param.data.narrow(0, offset, size), src.narrow(0, start, size), f"qkv shard {shard_id}")


class RowParallelLinear(PackedWeight):
    """Holds columns ``[rank*in/p, (rank+1)*in/p)`` of the [out, in] weight; input arrives
    split along its last dim; one all-reduce sums the partial outputs. With
    ``reduce_results=False`` the caller gets the partial and owns the sum (a MoE layer adds
    its shared expert's partial to the routed one and reduces once)."""

    def __init__(
        self, input_size: int, output_size: int, group: GroupCoordinator, bias: bool = False,
        dtype: torch.dtype = torch.float32, reduce_results: bool = True,
    ) -> None:
        super().__init__()
        assert reduce_results or not bias, "a bias must be added once, after the sum"
        self.group = group
        self.reduce_results = reduce_results
        self.input_size_per_partition = divide(input_size, group.world_size, "row-parallel input")
        self.weight = nn.Parameter(
            torch.empty(output_size, self.input_size_per_partition, dtype=dtype, device=group.device),
            requires_grad=False,
        )
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype, device=group.device), requires_grad=False)
            self.bias.weight_loader = self.bias_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, src: WeightSource, shard_id: object = None) -> None:
        n = self.input_size_per_partition
        copy_checked(param, src.narrow(1, self.group.rank_in_group * n, n), "row-parallel shard")

    def bias_loader(self, param: nn.Parameter, src: WeightSource, shard_id: object = None) -> None:
        copy_checked(param, src.full(), "row-parallel bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduce_results:
            return self.matmul(x)
        out = self.group.all_reduce(self.matmul(x))
        return out if self.bias is None else out + self.bias


class ReplicatedLinear(nn.Module):
    """The whole [out, in] weight on every rank, no collective (small projections such as a
    MoE router's shared-expert gate, where a split would cost more than it saves)."""

    def __init__(self, input_size: int, output_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)
