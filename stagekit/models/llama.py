"""Llama decoder layer (also Mistral), and the attention and MLP blocks the other families
reuse. Reads top to bottom; the TP split lives in the parallel layers it is built from, so
this file has no collectives."""

from __future__ import annotations

import torch
from torch import nn

from stagekit.config.model_config import ModelConfig
from stagekit.kv.forward_batch import ForwardBatch
from stagekit.layers.attention import Attention
from stagekit.layers.linear import QKVParallelLinear, RowParallelLinear
from stagekit.layers.mlp import GatedMLP
from stagekit.layers.norm import RMSNorm
from stagekit.layers.rotary import RotaryEmbedding
from stagekit.models import fused_decode
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.parallel_groups import ParallelGroups


class LlamaAttention(nn.Module):
    """With ``cfg.qk_norm`` (Qwen3) q and k get a per-head RMSNorm over head_dim before RoPE."""

    def __init__(self, cfg: ModelConfig, group: GroupCoordinator, local_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        d = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, d, cfg.num_heads, cfg.num_kv_heads, group, bias=cfg.qkv_bias, dtype=dtype
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, group, bias=cfg.o_bias, dtype=dtype)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, group.device) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, group.device) if cfg.qk_norm else None
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
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v.view(t, self.num_kv_heads, self.head_dim), batch)
        return self.o_proj(out)


class LlamaMLP(GatedMLP):
    def __init__(self, cfg: ModelConfig, group: GroupCoordinator, dtype: torch.dtype) -> None:
        super().__init__(cfg.hidden_size, cfg.intermediate_size, group, dtype)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block; the residual stream is carried beside the hidden states. The
    feed-forward block is ``build_mlp``'s, held under ``mlp_name`` (its checkpoint name):
    MoE families override both."""

    mlp_name = "mlp"

    # checkpoint name fragment -> (our fused parameter fragment, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self, cfg: ModelConfig, groups: ParallelGroups, layer_idx: int, local_idx: int, dtype: torch.dtype
    ) -> None:
        """``layer_idx`` is the layer's index in the model, ``local_idx`` in the stage."""
        super().__init__()
        self.self_attn = LlamaAttention(cfg, groups.tp, local_idx, dtype)
        self.add_module(self.mlp_name, self.build_mlp(cfg, groups, layer_idx, dtype))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, groups.device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, groups.device)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fused = fused_decode.run(self, hidden, residual, batch)  # a decode step in one native call, where it fits
        if fused is not None:
            return fused
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return getattr(self, self.mlp_name)(hidden), residual

    def build_mlp(self, cfg: ModelConfig, groups: ParallelGroups, layer_idx: int, dtype: torch.dtype) -> nn.Module:
        return LlamaMLP(cfg, groups.tp, dtype)
