"""Causal self-attention over each sequence's paged KV cache, with grouped-query attention
(several query heads share one KV head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stagekit.kernels.paged_decode import paged_decode
from stagekit.kv.forward_batch import ForwardBatch


class Attention(nn.Module):
    """Attention for ``num_heads`` local query heads over ``num_kv_heads`` local KV heads.
    ``layer_idx`` is the index among the stage's local layers (its KV cache slot)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.layer_idx = layer_idx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        # q: [T, Hq, D]; k, v: [T, Hk, D] -> [T, Hq * D]
        T, D = q.shape[0], self.head_dim
        k_cache, v_cache = batch.kv_cache.layer(self.layer_idx)  # [NB, Hk, BS, D] each
        k_cache[batch.write_blocks, :, batch.write_rows] = k.to(k_cache.dtype)  # [T, Hk, D] into place
        v_cache[batch.write_blocks, :, batch.write_rows] = v.to(v_cache.dtype)
        if batch.decode_rows is None:  # every sequence adds one token: the decode kernel does it all
            return paged_decode(q, k_cache, v_cache, batch.decode_tables, batch.decode_lens, self.scale).view(T, -1)
        out = torch.empty(T, self.num_heads * D, dtype=q.dtype, device=q.device)
        if batch.num_decodes:
            rows = batch.decode_rows
            out[rows] = paged_decode(q[rows], k_cache, v_cache, batch.decode_tables, batch.decode_lens,
                                     self.scale).view(rows.numel(), -1)
        gqa = self.num_heads != self.num_kv_heads
        for p in batch.prefills:
            total = p.num_computed + p.n
            qh = q[p.offset:p.offset + p.n].transpose(0, 1)                                # [Hq, n, D]
            kh = k_cache[p.context_blocks].transpose(0, 1).reshape(self.num_kv_heads, -1, D)[:, :total]
            vh = v_cache[p.context_blocks].transpose(0, 1).reshape(self.num_kv_heads, -1, D)[:, :total]
            mask = None
            if p.num_computed > 0:
                # query i sits at position num_computed + i and sees keys 0..num_computed + i
                mask = torch.ones(p.n, p.num_computed + p.n, dtype=torch.bool, device=q.device).tril(
                    diagonal=p.num_computed)
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, is_causal=mask is None,
                                               scale=self.scale, enable_gqa=gqa)
            out[p.offset:p.offset + p.n] = o.transpose(0, 1).reshape(p.n, -1)
        return out
