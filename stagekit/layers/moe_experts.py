"""A MoE layer's routed experts on one rank: stacked weights, their loaders, and the
grouped forward pass (tokens sorted by expert once, one gate/up and one down GEMM per
active expert, a weighted sum over each token's choices). With panel-packed weights and fp32
activations on the CPU, everything after the sort is one native call per layer
(kernels/moe_experts.c); otherwise, torch ops and one packed GEMM per projection.

Storage: the local experts are stacked, ``w13_weight`` [E_local, 2*I/tp, H] (each expert's
gate shard then its up shard, the layout transformers keeps in memory as
``gate_up_proj``) and ``w2_weight`` [E_local, H, I/tp]. Stacked rather than one module per
expert because it is two parameters instead of 3·E (E is 60-128 in real models), one
``[e]`` index selects an expert without Python attribute lookups, and a grouped GEMM
kernel can take the whole stack later; per-expert checkpoint tensors still load straight
into their slot through the parameters' own loaders.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from stagekit.kernels import moe_experts as native
from stagekit.kernels.panel_gemm import PackStats
from stagekit.layers.cpu_packed import CpuLinearWeight, CpuWeightPlan, packing_supported
from stagekit.layers.linear import divide
from stagekit.layers.weight_source import WeightSource, copy_checked
from stagekit.parallel.group import GroupCoordinator

log = logging.getLogger(__name__)

# shard ids of an expert's three projections, in checkpoint_names order
PROJECTIONS = ("gate", "up", "down")


class ExpertWeights(nn.Module):
    """Experts ``local_experts`` (global ids, ascending) of ``num_experts``, each with its
    intermediate dimension split over ``group``: slot ``i`` of both stacks holds expert
    ``local_experts[i]``, rows/columns ``[rank*I/tp, (rank+1)*I/tp)`` of its hidden units.
    ``forward`` returns this rank's partial sum of the routed output; tokens routed to an
    expert held elsewhere contribute nothing here."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, group: GroupCoordinator,
                 local_experts: list[int], checkpoint_names: tuple[str, str, str],
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.group, self.num_experts, self.local_experts = group, num_experts, list(local_experts)
        self.checkpoint_names = dict(zip(checkpoint_names, PROJECTIONS, strict=True))
        n = self.intermediate_per_partition = divide(intermediate_size, group.world_size, "expert intermediate size")
        e, device = len(self.local_experts), group.device
        self.w13_weight = nn.Parameter(torch.empty(e, 2 * n, hidden_size, dtype=dtype, device=device),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(e, hidden_size, n, dtype=dtype, device=device), requires_grad=False)
        self.w13_weight.weight_loader = self._load_w13
        self.w2_weight.weight_loader = self._load_w2
        self.w13_weight.required_shards = {(x, p) for x in self.local_experts for p in ("gate", "up")}
        self.w2_weight.required_shards = {(x, "down") for x in self.local_experts}
        # global expert id -> local slot; experts held elsewhere map to slot E_local, an
        # overflow bucket that sorts after every real slot and is never computed
        slot_of = torch.full((num_experts,), e, dtype=torch.int64)
        slot_of[self.local_experts] = torch.arange(e)
        self.register_buffer("slot_of", slot_of.to(device), persistent=False)
        self.register_buffer("slot_bounds", torch.arange(e + 1, device=device), persistent=False)
        self._packed: list[tuple[CpuLinearWeight, CpuLinearWeight]] | None = None
        self._panels: native.ExpertPanels | None = None  # the native call's view of _packed

    def checkpoint_tensors(self, prefix: str) -> dict[str, tuple[str, tuple[int, str]]]:
        """Checkpoint tensor name -> (parameter name, shard id) for every local expert, with
        ``prefix`` this module's name (``model.layers.L.mlp.experts``)."""
        out = {}
        for expert in self.local_experts:
            for frag, proj in self.checkpoint_names.items():
                param = "w2_weight" if proj == "down" else "w13_weight"
                out[f"{prefix}.{expert}.{frag}.weight"] = (f"{prefix}.{param}", (expert, proj))
        return out

    def _load_w13(self, param: nn.Parameter, src: WeightSource, shard_id: object) -> None:
        expert, proj = shard_id  # type: ignore[misc]
        n, rank = self.intermediate_per_partition, self.group.rank_in_group
        dst = param.data[self.local_experts.index(expert)].narrow(0, 0 if proj == "gate" else n, n)
        copy_checked(dst, src.narrow(0, rank * n, n), f"expert {expert} {proj} shard")

    def _load_w2(self, param: nn.Parameter, src: WeightSource, shard_id: object) -> None:
        expert, _ = shard_id  # type: ignore[misc]
        n, rank = self.intermediate_per_partition, self.group.rank_in_group
        copy_checked(param.data[self.local_experts.index(expert)], src.narrow(1, rank * n, n),
                     f"expert {expert} down shard")

    def pack_weights(self, plan: CpuWeightPlan = CpuWeightPlan()) -> PackStats | None:
        """Pack every local expert's two weights like the dense layers (fp32 CPU; panels for
        the few tokens an expert gets in a decode step) and drop the dense stacks; the
        rounding's stats, or None where nothing was packed."""
        if (self._packed is not None or plan.kernel == "dense" or not self.local_experts
                or not packing_supported(self.w13_weight[0])):
            return None
        self._packed = [(CpuLinearWeight(self.w13_weight.data[i], plan), CpuLinearWeight(self.w2_weight.data[i], plan))
                        for i in range(len(self.local_experts))]
        self.w13_weight.data = torch.empty(0, dtype=self.w13_weight.dtype)
        self.w2_weight.data = torch.empty(0, dtype=self.w2_weight.dtype)
        if all(w.panels is not None for pair in self._packed for w in pair) and native.native_available():
            try:
                self._panels = native.ExpertPanels([w13.panels for w13, _ in self._packed],
                                                   [w2.panels for _, w2 in self._packed],
                                                   self._packed[0][1].out_features, self.intermediate_per_partition)
            except ValueError as e:
                log.info("MoE experts keep the per-expert path: %s", e)
        stats = PackStats()
        for w13, w2 in self._packed:
            stats = stats + w13.stats + w2.stats
        return stats

    def packed_weights(self) -> list[tuple[CpuLinearWeight, CpuLinearWeight]] | None:
        """Each local expert's packed (w13, w2), or None before packing (or where nothing was packed)."""
        return self._packed

    def _expert(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        # x: [n, H] -> [n, H] (this rank's partial over its hidden-unit shard)
        if self._packed is not None and x.dtype == torch.float32:
            w13, w2 = self._packed[slot]
            gate, up = w13(x).chunk(2, dim=-1)
            return w2(F.silu(gate) * up)
        gate, up = F.linear(x, self.w13_weight[slot]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2_weight[slot])

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; topk_weights, topk_ids: [T, k] -> [T, H] in x's dtype."""
        t, k = topk_ids.shape
        # each token's choices in ascending expert order: adding them j = 0..k-1 below adds
        # the expert outputs in the order transformers' per-expert index_add_ loop does
        topk_ids, perm = topk_ids.sort(dim=-1)
        topk_weights = topk_weights.gather(-1, perm)
        if self._native(x, topk_weights):
            # the kernel weights the pairs and adds each token's k of them in the same order
            return self._run_native(x, topk_ids.flatten(), topk_weights.flatten(), k, combine=k)
        routed = self.grouped(x, topk_ids.flatten(), topk_weights.flatten(), rows_per_token=k)  # row t*k + j
        return sum_choices(routed.view(t, k, x.shape[-1]))

    def grouped(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor | None = None,
                rows_per_token: int = 1) -> torch.Tensor:
        """Row i of the result is row ``i // rows_per_token`` of ``x`` through expert
        ``expert_ids[i]`` (times ``weights[i]`` when given), in x's dtype; zero where that
        expert is held elsewhere. x: [N, H]; expert_ids (global ids), weights: [N * rows_per_token]."""
        if self._native(x, weights):
            return self._run_native(x, expert_ids, weights, rows_per_token, combine=1)
        order, bounds_t = self._sort(expert_ids)
        bounds = bounds_t.tolist()  # slot s: [bounds[s], bounds[s+1])
        out = torch.zeros(expert_ids.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)
        src = order // rows_per_token
        for slot in range(len(self.local_experts)):
            start, end = bounds[slot], bounds[slot + 1]
            if start == end:
                continue  # an expert without tokens costs nothing
            y = self._expert(slot, x[src[start:end]])
            if weights is not None:
                # the weight multiply happens in the weights' dtype (fp32 for Mixtral), then
                # rounds to x's dtype, as transformers' eager experts do
                y = y * weights[order[start:end], None]
            out[order[start:end]] = y.to(x.dtype)
        return out

    def _run_native(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor | None,
                    rows_per_token: int, combine: int) -> torch.Tensor:
        """The native call over x's tokens in chunks whose pairs fit its scratch bound (a row's
        result does not depend on the other rows, so chunking changes no bits)."""
        assert self._panels is not None
        if expert_ids.shape[0] != x.shape[0] * rows_per_token:
            raise ValueError(f"{expert_ids.shape[0]} expert ids for {x.shape[0]} rows of {rows_per_token} pairs each")
        out = torch.empty(expert_ids.shape[0] // combine, x.shape[-1], dtype=torch.float32)
        step = max(1, native.pairs_per_call(self._panels) // rows_per_token)  # tokens per call
        for lo in range(0, x.shape[0], step):
            a, b = lo * rows_per_token, min(lo + step, x.shape[0]) * rows_per_token
            order, bounds = self._sort(expert_ids[a:b])
            native.run(self._panels, x[lo:lo + step], order, bounds, None if weights is None else weights[a:b],
                       rows_per_token, combine, out=out[a // combine:b // combine])
        return out

    def _sort(self, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, bounds): one stable sort groups the pairs by local slot, ascending (pairs of
        experts held elsewhere last); slot s's pairs are order[bounds[s]:bounds[s+1]]."""
        sorted_slots, order = torch.sort(self.slot_of[expert_ids], stable=True)
        return order, torch.searchsorted(sorted_slots, self.slot_bounds)

    def _native(self, x: torch.Tensor, weights: torch.Tensor | None) -> bool:
        """Whether the native call takes this forward: panels packed for it, fp32 activations
        and weights on the CPU, and the fused native calls not turned off."""
        return (self._panels is not None and x.dtype == torch.float32 and x.device.type == "cpu"
                and (weights is None or weights.dtype == torch.float32) and native.enabled())


def sum_choices(routed: torch.Tensor) -> torch.Tensor:
    """[T, k, H] -> [T, H]: each token's k weighted expert outputs added j = 0..k-1."""
    # a sum over choices, not a scatter-add: CPU scatter_add_ runs a parallel region even
    # for a handful of rows, which stalls decode steps on busy cores (measured: tens of ms)
    out = routed[:, 0].clone()
    for j in range(1, routed.shape[1]):
        out += routed[:, j]
    return out
