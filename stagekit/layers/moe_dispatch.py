"""The expert-parallel dispatch/combine seam: each (token, choice) pair travels to the rank
holding its expert, is computed there, and comes back ("shuffle, forward, shuffle back").

The steps, per MoE layer, on every rank of the EP group:

1. ``dispatch``: the pairs are ordered by destination rank (a stable sort of the owners of
   their experts, so within a rank they keep their pair order), ``send_counts[r]`` is the
   number going to rank r, and two ``all_to_all`` calls move the pairs' token rows
   [n, H] and their expert ids [n]. Every rank learns how many rows each peer sends it.
2. The receiving rank runs the rows through its experts (``ExpertWeights.grouped``),
   unweighted.
3. ``combine``: one ``all_to_all`` with the received counts sends the outputs back; the
   source puts them in pair order, multiplies by the routing weights it kept, and adds
   each token's choices in ascending expert order, as transformers does.

The routing weights never travel: the weight multiply happens where the pair started, in
the weights' dtype, exactly as on a single rank, and the rows going out carry only what
the expert needs. Every rank enters all three collectives every layer, also with no
tokens (0-row tensors): a rank that skipped one would pair its next collective with a
peer's current one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stagekit.parallel.group import GroupCoordinator


@dataclass(frozen=True, slots=True)
class Dispatched:
    """What ``combine`` needs to undo a dispatch: the pairs' order, the counts each way."""

    order: torch.Tensor         # [T*k] pair index of each sent row, grouped by destination rank
    send_counts: list[int]      # rows sent to each rank
    recv_counts: list[int]      # rows received from each rank


class AllToAllDispatcher:
    """Moves (token, choice) pairs of one rank to the ranks of ``owner`` and back over
    ``ep_group``. Invariant: ``owner[e]`` is the EP rank holding expert e, the same map on
    every rank, and every rank calls ``dispatch`` then ``combine`` once per layer call."""

    def __init__(self, ep_group: GroupCoordinator, owner: list[int]) -> None:
        self.ep_group = ep_group
        self.owner = torch.tensor(owner, dtype=torch.int64, device=ep_group.device)

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Dispatched]:
        """x: [T, H]; topk_ids: [T, k] (each row ascending) -> (rows [n, H], expert ids [n])
        received from every rank (source-rank order), and the state ``combine`` needs."""
        k = topk_ids.shape[1]
        pair_experts = topk_ids.flatten()  # [T*k]
        dest = self.owner[pair_experts]
        order = torch.sort(dest, stable=True).indices
        send_counts = torch.bincount(dest, minlength=self.ep_group.world_size).tolist()
        rows, recv_counts = self.ep_group.all_to_all(x[order // k], send_counts)
        ids, _ = self.ep_group.all_to_all(pair_experts[order], send_counts)
        return rows, ids, Dispatched(order, send_counts, recv_counts)

    def combine(self, y: torch.Tensor, state: Dispatched, num_pairs: int) -> torch.Tensor:
        """y: [n, H], the expert outputs of the rows ``dispatch`` received, in that order ->
        [num_pairs, H], the outputs of this rank's pairs in pair order (unweighted)."""
        back, _ = self.ep_group.all_to_all(y, state.recv_counts)
        out = torch.empty(num_pairs, y.shape[-1], dtype=y.dtype, device=y.device)
        out[state.order] = back
        return out
