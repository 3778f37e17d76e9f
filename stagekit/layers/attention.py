"""Causal self-attention over each sequence's cached keys/values, with grouped-query
attention (several query heads share one KV head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stagekit.engine.forward_batch import ForwardBatch


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
        out = torch.empty(q.shape[0], self.num_heads * self.head_dim, dtype=q.dtype, device=q.device)
        gqa = self.num_heads != self.num_kv_heads
        offset = 0
        for s in batch.seqs:
            n = s.num_new
            kh, vh = batch.kv_cache.append(  # [Hk, L, D] each
                self.layer_idx, s.seq_id, s.num_computed, k[offset:offset + n], v[offset:offset + n]
            )
            if n == 1:
                out[offset] = self._decode_one(q[offset], kh, vh)
                offset += 1
                continue
            qh = q[offset:offset + n].transpose(0, 1)  # [Hq, n, D]
            mask = None
            if n > 1 and s.num_computed > 0:
                # query i sits at position num_computed + i and sees keys 0..num_computed + i
                total = s.num_computed + n
                mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(diagonal=s.num_computed)
            o = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask, is_causal=(n > 1 and mask is None), scale=self.scale, enable_gqa=gqa
            )
            out[offset:offset + n] = o.transpose(0, 1).reshape(n, -1)
            offset += n
        return out

    def _decode_one(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One query token: query heads grouped by their KV head (head h uses KV head
        h // group, as transformers' repeat_kv does), two batched matmuls, no KV copy."""
        # q: [Hq, D]; keys, values: [Hk, L, D] -> [Hq * D]
        qg = q.view(self.num_kv_heads, -1, self.head_dim)  # [Hk, G, D]
        scores = torch.bmm(qg, keys.transpose(1, 2)).mul_(self.scale)  # [Hk, G, L]
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.bmm(probs, values).reshape(-1)  # [Hk, G, D]
