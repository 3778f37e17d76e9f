"""RMSNorm with an optional fused residual add (the residual travels beside the hidden
states between layers and stages, as in vLLM's IntermediateTensors)."""

from __future__ import annotations

import torch
from torch import nn

from stagekit.layers.weight_source import default_weight_loader


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back like transformers."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: norm(x). With it: residual' = x + residual and
        (norm(residual'), residual')."""
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual
