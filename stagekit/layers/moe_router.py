"""The MoE router: which ``top_k`` experts each token goes to, and with what weight.

The arithmetic follows transformers 5.25 step for step, because greedy parity depends on
it: a routing weight rounded differently, or a near-tie broken the other way, changes the
token. Softmax over all experts in fp32, ``torch.topk`` (its tie order), then per family:
Mixtral always renormalises the k weights and keeps them fp32; Qwen2/Qwen3-MoE
renormalise only with ``norm_topk_prob`` and round the weights to the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stagekit.layers.weight_source import default_weight_loader


class TopKRouter(nn.Module):
    """The replicated [num_experts, hidden] gate; every rank routes every token the same way
    (same weights, same input, same deterministic ops)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool, weights_fp32: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be in 1..{num_experts} (the number of experts)")
        self.top_k, self.renormalize, self.weights_fp32 = top_k, renormalize, weights_fp32
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> (weights [T, k], expert ids [T, k] int64)."""
        logits = F.linear(x, self.weight)  # [T, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        if not self.weights_fp32:
            weights = weights.to(logits.dtype)
        return weights, ids
