"""Qwen3-MoE decoder layer: Qwen3's attention (per-head q/k RMSNorm, explicit head_dim),
a MoE block without a shared expert; ``norm_topk_prob`` from the config."""

from __future__ import annotations

from stagekit.models.sparse_decoder import SparseDecoderLayer


class Qwen3MoeDecoderLayer(SparseDecoderLayer):
    """Checkpoint names as Qwen2-MoE's, without ``shared_expert``; q/k norms in ``self_attn``."""
