"""Llama decoder layer (also Mistral). Reads top to bottom; the TP split lives in the
parallel layers it is built from, so this file has no collectives."""

from __future__ import annotations

import torch
from torch import nn

from stagekit.config.model_config import ModelConfig
from stagekit.kv.forward_batch import ForwardBatch
from stagekit.layers.activation import SiluAndMul
from stagekit.layers.attention import Attention
from stagekit.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from stagekit.layers.norm import RMSNorm
from stagekit.layers.rotary import RotaryEmbedding
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.parallel_groups import ParallelGroups


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, group: GroupCoordinator, local_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        d = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, d, cfg.num_heads, cfg.num_kv_heads, group, bias=cfg.qkv_bias, dtype=dtype
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, group, dtype=dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d
        self.rotary_emb = RotaryEmbedding(
            d, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, device=group.device
        )
        self.attn = Attention(self.num_heads, self.num_kv_heads, d, d**-0.5, local_idx)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hk) * D]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        t = x.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v.view(t, self.num_kv_heads, self.head_dim), batch)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, group: GroupCoordinator, dtype: torch.dtype) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [size, size], group, dtype=dtype)
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, group, dtype=dtype)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the residual stream is carried beside the hidden states."""

    # checkpoint name fragment -> (our fused parameter fragment, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, groups: ParallelGroups, local_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, groups.tp, local_idx, dtype)
        self.mlp = LlamaMLP(cfg, groups.tp, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, groups.device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, groups.device)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual
