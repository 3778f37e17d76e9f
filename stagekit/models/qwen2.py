"""Qwen2 decoder layer: Llama's block with biases on the q/k/v projections (the config
sets ``qkv_bias``, which the shared attention honours)."""

from __future__ import annotations

from stagekit.models.llama import LlamaDecoderLayer


class Qwen2DecoderLayer(LlamaDecoderLayer):
    """Same block and checkpoint names as Llama; ModelConfig.qkv_bias is True for Qwen2."""
