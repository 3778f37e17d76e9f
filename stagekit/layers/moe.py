"""The sparse MoE block: router -> top-k -> routed experts (+ a gated shared expert) -> sum.

Three ways to split it over ranks, chosen by which groups have more than one rank:

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
  - ``all_to_all`` (ranks holding different tokens, as with data-parallel attention): the
    pairs travel to their experts' ranks and back (``layers/moe_dispatch.py``); no
    all-reduce, each rank gets its own tokens' output.

- ``ep`` over replicas (``ep_group`` of N×tp ranks, ``tp_group`` of several, ``all_to_all``
  only): data-parallel attention with each replica's attention TP-sharded. The EP group is
  one stage position of N replicas (every TP rank of each), experts placed whole over it;
  ``tp_group`` is the replica's TP group, whose ranks hold the same tokens [T, H] after
  attention. So as not to send every token tp times, TP rank j routes all T tokens (its
  counters stay the replica's, as in the other modes) but dispatches only its chunk of
  them (``token_chunk``: tp contiguous, nearly equal row ranges, possibly empty), adds the
  shared expert (whole on every rank) for that chunk, and one all-gather over ``tp_group``
  puts the chunks back together. All-gather wants the same shape from every rank, so each
  chunk is padded to the largest (chunk 0) and trimmed after; every rank knows T, so the
  sizes need no exchange. ``local`` dispatch is refused here: it assumes every EP rank
  holds the same tokens, and another replica's ranks do not.

The family's rules (renormalise or not, routing weights kept fp32 or rounded) are the
router's; ``layers/moe_router.py`` says why they must match transformers exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    states are the full block output of this rank's tokens (the same tokens and output on
    every rank of ``tp_group``; with ``local`` dispatch on every rank of ``ep_group`` too).
    ``expert_tokens[e]`` counts the (token, choice) pairs this rank's router sent to expert
    e since start: every token the rank was given, also where it dispatches only a chunk of
    them, so any rank of a TP group counts its tokens once (the stage's, or the replica's)."""

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
        # both groups: TP rank j dispatches chunk j of the tokens its TP group shares (module docstring)
        self.split_tokens = self.ep_group is not None and tp_group.world_size > 1
        if self.split_tokens and dispatch != "all_to_all":
            raise ValueError(
                f"MoE with a tp group of {tp_group.world_size} ranks and an ep group of {self.ep_group.world_size} "
                "needs dispatch='all_to_all' (each tp rank sends its share of the tokens to the ep group); with "
                f"{dispatch!r} dispatch the experts are either split over tp ranks or placed over ep ranks, not both")
        device = tp_group.device
        self.gate = TopKRouter(hidden_size, num_experts, top_k, renormalize, weights_fp32, dtype, device)
        if self.ep_group is None:
            local, split_group = list(range(num_experts)), tp_group
        else:
            local = contiguous_placement(num_experts, self.ep_group.world_size, self.ep_group.rank_in_group)
            # placed whole: the experts' and shared expert's "split" is over this rank alone
            split_group = tp_group if tp_group.world_size == 1 else GroupCoordinator(
                [tp_group.ranks[tp_group.rank_in_group]], 0, device)
        self.dispatcher: AllToAllDispatcher | None = None
        if self.ep_group is not None and dispatch == "all_to_all":
            self.dispatcher = AllToAllDispatcher(self.ep_group, expert_owner(num_experts, self.ep_group.world_size))
        # read by the stage's metrics thread at any time; int64 adds leave no torn values it cares about
        self.register_buffer("expert_tokens", torch.zeros(num_experts, dtype=torch.int64, device=device),
                             persistent=False)
        self.experts = ExpertWeights(num_experts, hidden_size, intermediate_size, split_group, local,
                                     checkpoint_names, dtype)
        self.shared_expert: GatedMLP | None = None
        if shared_expert_intermediate_size:
            # under tp: split and left unreduced, summed with the routed partial below
            self.shared_expert = GatedMLP(hidden_size, shared_expert_intermediate_size, split_group, dtype,
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
        if self.ep_group is None:
            out = self.experts(x, topk_weights, topk_ids)
            return self.tp_group.all_reduce(out if self.shared_expert is None else out + self._shared(x))
        if not self.split_tokens:
            return self._expert_parallel(x, topk_weights, topk_ids)
        t = x.shape[0]
        lo, hi = token_chunk(t, self.tp_group.world_size, self.tp_group.rank_in_group)
        out = self._expert_parallel(x[lo:hi], topk_weights[lo:hi], topk_ids[lo:hi])  # [hi - lo, hidden]
        return self._gather_chunks(out, t)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        assert self.shared_expert is not None
        return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def _expert_parallel(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The block output of x's tokens with the experts placed over ``ep_group``."""
        if self.dispatcher is not None:
            out = self._all_to_all(x, topk_weights, topk_ids)
        else:
            out = self.ep_group.all_reduce(self.experts(x, topk_weights, topk_ids))
        # the shared expert is whole here: added after the routed sum, no communication
        return out if self.shared_expert is None else out + self._shared(x)

    def _gather_chunks(self, out: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """This rank's chunk [n, H] -> every TP rank's chunks in token order [num_tokens, H]."""
        tp = self.tp_group.world_size
        largest = -(-num_tokens // tp)  # chunk 0's size
        if largest == 0:
            return out  # no tokens on any rank of the TP group (they share them): nothing to gather
        # all-gather takes one shape from every rank: pad to the largest chunk, trim after
        padded = F.pad(out, (0, 0, 0, largest - out.shape[0]))
        parts = self.tp_group.all_gather(padded, dim=0).view(tp, largest, -1)  # [tp, largest, H]
        return join_chunks(parts, num_tokens)

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


def token_chunk(num_tokens: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """The rows [lo, hi) of ``num_tokens`` that TP rank ``tp_rank`` dispatches: ``tp_size``
    contiguous chunks, the first ``num_tokens % tp_size`` one row longer (with fewer tokens
    than ranks the last ones empty), as ``torch.tensor_split`` cuts them."""
    base, rem = divmod(num_tokens, tp_size)
    lo = tp_rank * base + min(tp_rank, rem)
    return lo, lo + base + (1 if tp_rank < rem else 0)


def join_chunks(parts: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[tp, largest, H], chunk j of ``token_chunk`` padded at its end to the largest ->
    [num_tokens, H]: the chunks trimmed and concatenated in rank order."""
    tp = parts.shape[0]
    if num_tokens == tp * parts.shape[1]:
        return parts.view(num_tokens, -1)
    sizes = [hi - lo for lo, hi in (token_chunk(num_tokens, tp, j) for j in range(tp))]
    return torch.cat([parts[j, :n] for j, n in enumerate(sizes)])
