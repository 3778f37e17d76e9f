"""The decoder layer of the MoE families: Llama's block (attention options from the
config) with a sparse MoE block in the layers the config makes sparse, a dense MLP in the
others."""

from __future__ import annotations

import torch
from torch import nn

from stagekit.config.model_config import ModelConfig
from stagekit.layers.moe import FusedMoE
from stagekit.models.llama import LlamaDecoderLayer, LlamaMLP
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.parallel_groups import ParallelGroups


class SparseDecoderLayer(LlamaDecoderLayer):
    """``build_mlp`` gives a FusedMoE where ``cfg.is_sparse_layer(layer_idx)``: with no
    ``groups.ep`` of several ranks its experts are split over the stage's TP group (the
    ``tp`` mode); with one (the ``ep`` mode) they are placed whole over it and nothing of
    the block is split over TP, except that an EP group over several replicas' TP groups
    (data-parallel attention) splits the tokens over TP (layers/moe.py).
    ``expert_checkpoint_names`` are the family's per-expert tensor names for gate, up and down."""

    expert_checkpoint_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def build_mlp(self, cfg: ModelConfig, groups: ParallelGroups, layer_idx: int, dtype: torch.dtype) -> nn.Module:
        if not cfg.is_sparse_layer(layer_idx):
            return LlamaMLP(cfg, groups.tp, dtype)
        ep = groups.ep if groups.ep is not None and groups.ep.world_size > 1 else None
        tp = groups.tp
        # an EP group spanning several replicas' TP groups (data-parallel attention) keeps the real TP
        # group: each TP rank dispatches its chunk of the replica's tokens and they gather the output
        spans_replicas = groups.ep_all_to_all and ep is not None and ep.world_size > tp.world_size
        if ep is not None and not spans_replicas:  # experts and shared expert whole here: "split" over itself
            tp = GroupCoordinator([tp.ranks[tp.rank_in_group]], 0, tp.device)
        return FusedMoE(
            cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
            renormalize=cfg.norm_topk_prob, weights_fp32=cfg.routing_weights_fp32,
            tp_group=tp, ep_group=ep, dispatch="all_to_all" if groups.ep_all_to_all else "local",
            shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
            checkpoint_names=self.expert_checkpoint_names, dtype=dtype,
        )
