"""Qwen3 decoder layer: Llama's block with a per-head RMSNorm on q and k before RoPE (the
config sets ``qk_norm``, which the shared attention honours) and an explicit head_dim."""

from __future__ import annotations

from stagekit.models.llama import LlamaDecoderLayer


class Qwen3DecoderLayer(LlamaDecoderLayer):
    """Same block and checkpoint names as Llama plus ``self_attn.{q,k}_norm``."""
