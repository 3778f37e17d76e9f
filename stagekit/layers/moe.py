"""The sparse MoE block: router -> top-k -> routed experts (+ a gated shared expert) -> sum.

Two ways to split it over a stage's ranks, chosen by which group has more than one rank:

- ``tp`` (``ep_group`` of one rank): every rank holds every expert, each expert's
  intermediate dimension split over ``tp_group`` like a dense MLP; the shared expert is
  split the same way. The routed and shared partials are added and summed with **one**
  all-reduce (as a RowParallelLinear would).
- ``ep`` (``ep_group`` of several ranks, ``tp_group`` of one): experts are placed whole
  over the EP ranks (``parallel/expert_placement.py``); the shared expert is held whole on
  every rank and added after the routed output, with no communication. The routed tokens
  reach their experts one of two ways (``dispatch``):

  - ``local`` (the default inside a stage, where every rank holds the same tokens after
    attention): every rank routes every token, computes only its experts' pairs, and one
    all-reduce over ``ep_group`` sums the routed output — the collective count of ``tp``.
  - ``all_to_all`` (ranks holding different tokens, as data-parallel attention will): the
    pairs travel to their experts' ranks and back (``layers/moe_dispatch.py``); no
    all-reduce, each rank gets its own tokens' output.

The family's rules (renormalise or not, routing weights kept fp32 or rounded) are the
router's; ``layers/moe_router.py`` says why they must match transformers exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from stagekit.layers.linear import ReplicatedLinear
from stagekit.layers.mlp import GatedMLP
from stagekit.layers.moe_dispatch import AllToAllDispatcher
from stagekit.layers.moe_experts import ExpertWeights, sum_choices
from stagekit.layers.moe_router import TopKRouter
from stagekit.parallel.expert_placement import contiguous_placement, expert_owner
from stagekit.parallel.group import GroupCoordinator

DISPATCH = ("local", "all_to_all")


class FusedMoE(nn.Module):
    """One MoE block on one rank. Submodule names match the HF checkpoint (``gate``,
    ``experts``, ``shared_expert``, ``shared_expert_gate``). Invariant: the returned hidden
    states are the full block output of this rank's tokens (with ``local`` dispatch the
    same tokens and output on every rank). ``expert_tokens[e]`` counts the (token, choice)
    pairs this rank's router sent to expert e since start."""

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int, *,
        renormalize: bool, weights_fp32: bool, tp_group: GroupCoordinator, ep_group: GroupCoordinator | None = None,
        shared_expert_intermediate_size: int = 0, checkpoint_names: tuple[str, str, str] = ("gate_proj", "up_proj",
                                                                                            "down_proj"),
        dtype: torch.dtype = torch.float32, dispatch: str = "local",
    ) -> None:
        super().__init__()
        if dispatch not in DISPATCH:
            raise ValueError(f"MoE dispatch must be one of {', '.join(DISPATCH)}, got {dispatch!r}")
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
        self.dispatcher: AllToAllDispatcher | None = None
        if self.ep_group is not None and dispatch == "all_to_all":
            self.dispatcher = AllToAllDispatcher(self.ep_group, expert_owner(num_experts, self.ep_group.world_size))
        # read by the stage's metrics thread at any time; int64 adds leave no torn values it cares about
        self.register_buffer("expert_tokens", torch.zeros(num_experts, dtype=torch.int64, device=device),
                             persistent=False)
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
        self.expert_tokens += torch.bincount(topk_ids.flatten(), minlength=self.expert_tokens.shape[0])
        if self.dispatcher is not None:
            out = self._all_to_all(x, topk_weights, topk_ids)
        else:
            out = self.experts(x, topk_weights, topk_ids)
        shared = None
        if self.shared_expert is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.ep_group is not None:
            if self.dispatcher is None:
                out = self.ep_group.all_reduce(out)
            return out if shared is None else out + shared
        return self.tp_group.all_reduce(out if shared is None else out + shared)

    def _all_to_all(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        assert self.dispatcher is not None
        t, k = topk_ids.shape
        # choices in ascending expert order, so the sum below adds them as transformers does
        topk_ids, perm = topk_ids.sort(dim=-1)
        topk_weights = topk_weights.gather(-1, perm)
        rows, ids, state = self.dispatcher.dispatch(x, topk_ids)   # the pairs this rank's experts compute
        y = self.experts.grouped(rows, ids)                          # [n, H] unweighted
        pairs = self.dispatcher.combine(y, state, t * k)             # [T*k, H], this rank's pairs
        # weighted where the pair started, in the weights' dtype, rounded to x's (as on one rank)
        weighted = (pairs * topk_weights.flatten()[:, None]).to(x.dtype)
        return sum_choices(weighted.view(t, k, x.shape[-1]))
