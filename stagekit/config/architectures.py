"""The model families stagemesh serves, as data: one entry per HF architecture class.

Config and models both read this table and nothing else to tell families apart:
``load_model_config`` takes the family-dependent fields from an entry, and the model
registry builds the entry's decoder layer. A new family is an entry here plus a layer
file in ``stagekit/models/``; no other module names an architecture.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Architecture:
    """How to read and build one HF ``architectures`` class.

    ``decoder_layer`` is ``module:Class`` under ``stagekit.models`` (a name, not an import:
    config sits below models). ``qkv_bias`` is the family's fixed answer, or None when the
    checkpoint's ``attention_bias`` says. ``sliding_window_default`` is what a config without
    ``use_sliding_window`` means (Mistral's configs leave it out and use their window)."""

    name: str
    decoder_layer: str
    qkv_bias: bool | None = None
    sliding_window_default: bool = False

    def has_qkv_bias(self, hf_config: dict) -> bool:
        if self.qkv_bias is not None:
            return self.qkv_bias
        return bool(hf_config.get("attention_bias", False))


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("LlamaForCausalLM", "llama:LlamaDecoderLayer"),
    Architecture("MistralForCausalLM", "llama:LlamaDecoderLayer", sliding_window_default=True),
    Architecture("Qwen2ForCausalLM", "qwen2:Qwen2DecoderLayer", qkv_bias=True),
)}
