"""oneDNN-prepacked weights for fp32 linear layers on the CPU.

At the token counts of decode, MKL's small-M GEMM behind F.linear is far from the
memory-bandwidth floor; oneDNN with a weight reordered once is not (the step's matmuls
take about a third of F.linear's time at one token: docs/benchmarks.md, "Measurements
behind design choices"). Results equal F.linear to ~1e-6. Once packed, the dense copy of
the weight is released (the packed one is the only copy kept).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# batch-size hint for the reorder: measured to suit 1..128 tokens per step
_PACK_HINT = 32


def row_bucket(m: int) -> int:
    """Pad the token count to one of a bounded set of sizes: oneDNN builds (and keeps) a
    primitive per input shape, so unbounded distinct counts grow the process's memory
    (measured: ~17 MiB per 1,000 varied requests, none with buckets). Small counts stay
    exact (decode batches); then steps of 8 up to 128 and of 64 beyond."""
    if m <= 8:
        return m
    if m <= 128:
        return -(-m // 8) * 8
    return -(-m // 64) * 64


def packing_supported(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """The oneDNN-reordered copy of an [out, in] weight (check ``packing_supported`` first)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a weight packed by ``pack_linear_weight``; x: [T, in] fp32 -> [T, out]."""
    m = x.shape[0]
    rows = row_bucket(m)
    if rows != m:
        x = F.pad(x, (0, 0, 0, rows - m))
    out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out if rows == m else out[:m]


class PackedWeight(nn.Module):
    """Mixin for layers whose forward is ``x @ weight.T``: ``pack_weights`` swaps the dense
    weight for a prepacked one; ``matmul`` uses whichever the layer holds."""

    packed_weight: torch.Tensor | None = None

    def pack_weights(self) -> bool:
        weight = self.weight
        if self.packed_weight is not None or not packing_supported(weight):
            return False
        self.packed_weight = pack_linear_weight(weight.data)
        weight.data = torch.empty(0, dtype=weight.dtype)
        return True

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        if self.packed_weight is not None and x.dtype == torch.float32 and x.dim() == 2:
            return packed_linear(x, self.packed_weight, bias)
        return F.linear(x, self.weight, bias)


def pack_model_weights(model: nn.Module) -> int:
    """Pack every layer of ``model`` that can (PackedWeight layers, and others such as the
    MoE experts that define their own ``pack_weights``); returns how many were packed."""
    return sum(1 for m in model.modules() if callable(getattr(m, "pack_weights", None)) and m.pack_weights())
