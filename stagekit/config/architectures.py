"""The model families stagemesh serves, as data: one entry per HF architecture class.

Config and models both read this table and nothing else to tell families apart:
``load_model_config`` takes the family-dependent fields from an entry, and the model
registry builds the entry's decoder layer. A new family is an entry here plus a layer
file in ``stagekit/models/``; no other module names an architecture.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MoeFields:
    """Where a family's config.json keeps its MoE hyper-parameters, and its routing rules.

    ``shared_expert_key`` is None for families without a shared expert;
    ``norm_topk_prob_key`` None means the family always renormalises the top-k weights
    (Mixtral). ``weights_fp32``: the routing weights stay fp32 (Mixtral) instead of being
    rounded to the model's dtype (Qwen). ``sparse_step`` families read
    ``decoder_sparse_step`` and ``mlp_only_layers``; the others are sparse in every layer."""

    # the first present wins: transformers maps each name to the other (Qwen3-MoE's config
    # writes num_local_experts, the Hub's Qwen3-MoE configs say num_experts)
    num_experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts")
    intermediate_key: str = "moe_intermediate_size"
    shared_expert_key: str | None = None
    norm_topk_prob_key: str | None = "norm_topk_prob"
    weights_fp32: bool = False
    sparse_step: bool = True


@dataclass(frozen=True, slots=True)
class Architecture:
    """How to read and build one HF ``architectures`` class.

    ``decoder_layer`` is ``module:Class`` under ``stagekit.models`` (a name, not an import:
    config sits below models). ``qkv_bias`` is the family's fixed answer, or None when the
    checkpoint's ``qkv_bias_key`` says (``qkv_bias_default`` when absent); ``o_bias`` whether
    the output projection takes the same bias setting (Qwen3) or never has one.
    ``sliding_window_default`` is what a config without ``use_sliding_window`` means
    (Mistral's configs leave it out and use their window). ``qk_norm``: a per-head RMSNorm
    on q and k before RoPE. ``moe``: the family's MoE fields, None for dense families."""

    name: str
    decoder_layer: str
    qkv_bias: bool | None = None
    sliding_window_default: bool = False
    qkv_bias_key: str = "attention_bias"
    qkv_bias_default: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    moe: MoeFields | None = None

    def has_qkv_bias(self, hf_config: dict) -> bool:
        if self.qkv_bias is not None:
            return self.qkv_bias
        return bool(hf_config.get(self.qkv_bias_key, self.qkv_bias_default))


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("LlamaForCausalLM", "llama:LlamaDecoderLayer"),
    Architecture("MistralForCausalLM", "llama:LlamaDecoderLayer", sliding_window_default=True),
    Architecture("Qwen2ForCausalLM", "qwen2:Qwen2DecoderLayer", qkv_bias=True),
    Architecture("Qwen3ForCausalLM", "qwen3:Qwen3DecoderLayer", o_bias=True, qk_norm=True),
    Architecture("MixtralForCausalLM", "mixtral:MixtralDecoderLayer", qkv_bias=False, sliding_window_default=True,
                 moe=MoeFields(intermediate_key="intermediate_size",
                               norm_topk_prob_key=None, weights_fp32=True, sparse_step=False)),
    Architecture("Qwen2MoeForCausalLM", "qwen2_moe:Qwen2MoeDecoderLayer", qkv_bias_key="qkv_bias",
                 qkv_bias_default=True, moe=MoeFields(shared_expert_key="shared_expert_intermediate_size")),
    Architecture("Qwen3MoeForCausalLM", "qwen3_moe:Qwen3MoeDecoderLayer", o_bias=True, qk_norm=True,
                 moe=MoeFields()),
)}
