"""Small random-weight HF checkpoints built with transformers, and its reference outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

PROMPTS = [[1, 17, 42, 99, 5], [7], list(range(30, 70)), [250, 3, 3, 3, 8, 100, 12]]
NUM_NEW = 16


@dataclass
class Reference:
    path: str
    vocab_size: int
    tokens: list[list[int]]          # greedy continuation per prompt
    first_logprobs: list[torch.Tensor]  # log_softmax of the last prompt position's logits [vocab]


MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "qwen3")


def _moe_config(arch: str, common: dict):
    """The MoE families (and dense Qwen3); references run transformers' eager experts."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(common, num_key_value_heads=2, tie_word_embeddings=False)
    moe = dict(num_experts_per_tok=2, experts_implementation="eager")
    if arch == "mixtral":
        return MixtralConfig(num_local_experts=8, **moe, **common)
    if arch == "qwen2_moe":  # 6 experts, shared expert, no renormalisation, layer 2 dense
        return Qwen2MoeConfig(num_experts=6, moe_intermediate_size=48, shared_expert_intermediate_size=96,
                              norm_topk_prob=False, mlp_only_layers=[2], **moe, **common)
    if arch == "qwen3_moe":  # head_dim 32 != hidden / heads
        return Qwen3MoeConfig(num_experts=8, moe_intermediate_size=48, norm_topk_prob=True, head_dim=32,
                              **moe, **common)
    return Qwen3Config(head_dim=32, attention_bias=True, **common)  # biases on q/k/v and o


def _config(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                  vocab_size=256, max_position_embeddings=256, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        # GQA 4:2, Llama-3 rope scaling, untied head
        return LlamaConfig(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                           **common)
    if arch in MOE_ARCHS:
        return _moe_config(arch, common)
    if arch == "mistral":  # Llama's block under another name, with a sliding window beyond our context
        return MistralConfig(num_key_value_heads=2, sliding_window=4096, tie_word_embeddings=False, **common)
    # one KV head (replicated at TP2), q/k/v biases, tied embeddings
    return Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **common)


def build_checkpoint(arch: str, root: Path, seed: int = 0) -> Reference:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _config(arch)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # biases start at zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.1)
    path = root / arch
    # llama is saved in several safetensors files (five, with an index); qwen2 in one
    model.save_pretrained(path, max_shard_size="200KB" if arch == "llama" else "50MB")
    model.generation_config.eos_token_id = None
    tokens, first = [], []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            out = model.generate(ids, max_new_tokens=NUM_NEW, do_sample=False, pad_token_id=0)
            tokens.append(out[0, len(p):].tolist())
            first.append(torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1))
    return Reference(str(path), cfg.vocab_size, tokens, first)
