"""Qwen2-MoE decoder layer: Qwen2's attention (q/k/v biases), a MoE block with a shared
expert scaled by ``sigmoid(shared_expert_gate(x))``, dense MLP layers where
``mlp_only_layers`` or ``decoder_sparse_step`` say so."""

from __future__ import annotations

from stagekit.models.sparse_decoder import SparseDecoderLayer


class Qwen2MoeDecoderLayer(SparseDecoderLayer):
    """Checkpoint names ``mlp.gate``, ``mlp.experts.N.{gate,up,down}_proj``, ``mlp.shared_expert.*``."""
