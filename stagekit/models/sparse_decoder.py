"""The decoder layer of the MoE families: Llama's block (attention options from the
config) with a sparse MoE block in the layers the config makes sparse, a dense MLP in the
others."""

from __future__ import annotations

import torch
from torch import nn

from stagekit.config.model_config import ModelConfig
from stagekit.layers.moe import FusedMoE
from stagekit.models.llama import LlamaDecoderLayer, LlamaMLP
from stagekit.parallel.parallel_groups import ParallelGroups


class SparseDecoderLayer(LlamaDecoderLayer):
    """``build_mlp`` gives a FusedMoE where ``cfg.is_sparse_layer(layer_idx)``; the experts
    are split over the stage's TP group (the ``tp`` mode). ``expert_checkpoint_names`` are
    the family's per-expert tensor names for gate, up and down."""

    expert_checkpoint_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def build_mlp(self, cfg: ModelConfig, groups: ParallelGroups, layer_idx: int, dtype: torch.dtype) -> nn.Module:
        if not cfg.is_sparse_layer(layer_idx):
            return LlamaMLP(cfg, groups.tp, dtype)
        return FusedMoE(
            cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
            renormalize=cfg.norm_topk_prob, weights_fp32=cfg.routing_weights_fp32,
            tp_group=groups.tp, ep_group=groups.ep,
            shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
            checkpoint_names=self.expert_checkpoint_names, dtype=dtype,
        )
