"""What distinguishes each demo architecture: its HF class, the trained tokenizer it reuses,
its family-specific config fields, and the tensors of one layer's feed-forward block.

The MoE demos reuse the dense shapes (hidden size, heads, layers) and add experts: 8
experts, top-2. ``small`` MoE models hold ~300M parameters of which ~100M are active per
token, so one generated token costs about what the dense ``small`` one does.
"""

from __future__ import annotations

from typing import Any

ARCH_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# the trained tokenizer (and its bos/eos conventions) each architecture uses
TOKENIZER = {"llama": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen2_moe": "qwen2", "qwen3_moe": "qwen2",
             "qwen3": "qwen2"}
MOE_SHAPES = {  # per size: experts, top-k, expert hidden units, shared expert hidden units
    "tiny": {"experts": 8, "top_k": 2, "moe_intermediate": 64, "shared_intermediate": 128},
    "small": {"experts": 8, "top_k": 2, "moe_intermediate": 1024, "shared_intermediate": 2048},
}


def family_config(arch: str, size: str, layers: int) -> dict[str, Any]:
    """The config.json fields that depend on the architecture (added to the common ones)."""
    moe = MOE_SHAPES[size]
    if arch == "llama":
        return dict(rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, attention_bias=False, mlp_bias=False,
                    pretraining_tp=1, tie_word_embeddings=False)
    if arch == "mixtral":
        return dict(rms_norm_eps=1e-5, rope_theta=1000000.0, rope_scaling=None, sliding_window=None,
                    tie_word_embeddings=False,
                    intermediate_size=moe["moe_intermediate"], num_local_experts=moe["experts"],
                    num_experts_per_tok=moe["top_k"], router_jitter_noise=0.0)
    qwen: dict[str, Any] = dict(rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None, use_sliding_window=False,
                                sliding_window=None, max_window_layers=layers,
                                tie_word_embeddings=arch in ("qwen2", "qwen3"))
    if arch in ("qwen3", "qwen3_moe"):
        qwen["attention_bias"] = False
    if arch in ("qwen2_moe", "qwen3_moe"):
        qwen.update(num_experts=moe["experts"], num_experts_per_tok=moe["top_k"],
                    moe_intermediate_size=moe["moe_intermediate"], decoder_sparse_step=1, mlp_only_layers=[],
                    norm_topk_prob=arch == "qwen3_moe")
    if arch == "qwen2_moe":
        qwen["shared_expert_intermediate_size"] = moe["shared_intermediate"]
    return qwen


def has_qkv_bias(config: dict[str, Any]) -> bool:
    return config["model_type"] in ("qwen2", "qwen2_moe")


def has_qk_norm(config: dict[str, Any]) -> bool:
    return config["model_type"] in ("qwen3", "qwen3_moe")


def ffn_shapes(config: dict[str, Any], prefix: str) -> dict[str, tuple[int, ...]]:
    """The feed-forward tensors of the layer named ``prefix`` (``model.layers.N``), HF names."""
    hidden, kind = config["hidden_size"], config["model_type"]
    if kind in ("llama", "qwen2", "qwen3"):
        return _gated(f"{prefix}.mlp", hidden, config["intermediate_size"], ("gate_proj", "up_proj", "down_proj"))
    if kind == "mixtral":
        block, names, num, inter = "block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts", "intermediate_size"
    else:
        block, names, num, inter = "mlp", ("gate_proj", "up_proj", "down_proj"), "num_experts", "moe_intermediate_size"
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}.{block}.gate.weight": (config[num], hidden)}
    for e in range(config[num]):
        shapes.update(_gated(f"{prefix}.{block}.experts.{e}", hidden, config[inter], names))
    if config.get("shared_expert_intermediate_size"):
        shapes.update(_gated(f"{prefix}.mlp.shared_expert", hidden, config["shared_expert_intermediate_size"],
                             ("gate_proj", "up_proj", "down_proj")))
        shapes[f"{prefix}.mlp.shared_expert_gate.weight"] = (1, hidden)
    return shapes


def _gated(prefix: str, hidden: int, inter: int, names: tuple[str, str, str]) -> dict[str, tuple[int, ...]]:
    gate, up, down = names
    return {f"{prefix}.{gate}.weight": (inter, hidden), f"{prefix}.{up}.weight": (inter, hidden),
            f"{prefix}.{down}.weight": (hidden, inter)}
