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
    if arch == "mistral":  # Llama's block under another name, with a sliding window beyond our context
        return MistralConfig(num_key_value_heads=2, sliding_window=4096, tie_word_embeddings=False, **common)
    # one KV head (replicated at TP2), q/k/v biases, tied embeddings
    return Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **common)


def build_checkpoint(arch: str, root: Path, seed: int = 0) -> Reference:
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = _config(arch)
    cls = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}[arch]
    model = cls(cfg).eval()
    if arch == "qwen2":  # biases start at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
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
