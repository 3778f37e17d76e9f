"""Mixtral decoder layer: Mistral's attention, a sparse MoE block in every layer, stored
under ``block_sparse_moe`` with experts ``w1`` (gate), ``w3`` (up), ``w2`` (down). The
router always renormalises its top-k weights and keeps them fp32 (ModelConfig says so)."""

from __future__ import annotations

from stagekit.models.sparse_decoder import SparseDecoderLayer


class MixtralDecoderLayer(SparseDecoderLayer):
    """Checkpoint names ``model.layers.L.block_sparse_moe.{gate,experts.N.w1,...}``."""

    mlp_name = "block_sparse_moe"
    expert_checkpoint_names = ("w1", "w3", "w2")
