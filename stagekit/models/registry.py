"""Which HF architectures we serve and which decoder layer builds each."""

from __future__ import annotations

from collections.abc import Callable

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}


def qkv_bias_for(architecture: str, cfg: dict) -> bool:
    """Qwen2 always has q/k/v biases; Llama-family checkpoints say so in ``attention_bias``."""
    if SUPPORTED_ARCHITECTURES[architecture] == "qwen2":
        return True
    return bool(cfg.get("attention_bias", False))


def decoder_layer_class(architecture: str) -> Callable:
    family = SUPPORTED_ARCHITECTURES[architecture]
    if family == "qwen2":
        from stagekit.models.qwen2 import Qwen2DecoderLayer

        return Qwen2DecoderLayer
    from stagekit.models.llama import LlamaDecoderLayer

    return LlamaDecoderLayer
