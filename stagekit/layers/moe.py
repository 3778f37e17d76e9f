"""The sparse MoE block: router -> top-k -> routed experts (+ a gated shared expert) -> sum.

Two ways to split it over a stage's ranks, chosen by which group has more than one rank:

- ``tp`` (``ep_group`` of one rank): every rank holds every expert, each expert's
  intermediate dimension split over ``tp_group`` like a dense MLP; the shared expert is
  split the same way. The routed and shared partials are added and summed with **one**
  all-reduce (as a RowParallelLinear would).
- ``ep`` (``ep_group`` of several ranks, ``tp_group`` of one): experts are placed whole
  over the EP ranks (``parallel/expert_placement.py``); every rank routes every token (the
  tokens are the same on every rank after attention), computes only its experts, and one
  all-reduce over ``ep_group`` sums the routed output. The shared expert is held whole on
  every rank and added after the sum, with no communication.

The family's rules (renormalise or not, routing weights kept fp32 or rounded) are the
router's; ``layers/moe_router.py`` says why they must match transformers exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from stagekit.layers.linear import ReplicatedLinear
from stagekit.layers.mlp import GatedMLP
from stagekit.layers.moe_experts import ExpertWeights
from stagekit.layers.moe_router import TopKRouter
from stagekit.parallel.expert_placement import contiguous_placement
from stagekit.parallel.group import GroupCoordinator


class FusedMoE(nn.Module):
    """One MoE block on one rank. Submodule names match the HF checkpoint (``gate``,
    ``experts``, ``shared_expert``, ``shared_expert_gate``). Invariant: the returned
    hidden states are the full block output, identical on every rank of the stage."""

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, *,
        renormalize: bool, weights_fp32: bool, tp_group: GroupCoordinator, ep_group: GroupCoordinator | None = None,
        shared_expert_intermediate_size: int = 0, checkpoint_names: tuple[str, str, str] = ("gate_proj", "up_proj",
                                                                                            "down_proj"),
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.ep_group = ep_group if ep_group is not None and ep_group.world_size > 1 else None
        if self.ep_group is not None and tp_group.world_size > 1:
            raise ValueError("MoE experts are either split over tp ranks or placed over ep ranks, not both")
        device = tp_group.device
        self.gate = TopKRouter(hidden_size, num_experts, top_k, renormalize, weights_fp32, dtype, device)
        if self.ep_group is None:
            local = list(range(num_experts))
        else:
            local = contiguous_placement(num_experts, self.ep_group.world_size, self.ep_group.rank_in_group)
        self.experts = ExpertWeights(num_experts, hidden_size, intermediate_size, tp_group, local,
                                     checkpoint_names, dtype)
        self.shared_expert: GatedMLP | None = None
        if shared_expert_intermediate_size:
            # under tp: split and left unreduced, summed with the routed partial below
            self.shared_expert = GatedMLP(hidden_size, shared_expert_intermediate_size, tp_group, dtype,
                                          reduce_results=False)
            self.shared_expert_gate = ReplicatedLinear(hidden_size, 1, dtype, device)

    @property
    def local_experts(self) -> list[int]:
        """Global ids of the experts this rank computes, ascending."""
        return self.experts.local_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        topk_weights, topk_ids = self.gate(x)  # [T, k] each
        out = self.experts(x, topk_weights, topk_ids)
        shared = None
        if self.shared_expert is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.ep_group is not None:
            out = self.ep_group.all_reduce(out)
            return out if shared is None else out + shared
        return self.tp_group.all_reduce(out if shared is None else out + shared)
