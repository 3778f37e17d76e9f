"""Packed weights for linear layers on the CPU: 16-row panels for the native small-batch GEMM
(stagekit/kernels/panel_gemm.c; fp32, fp16 or bf16 storage) and oneDNN's reordered layout.

At the token counts of decode, MKL's small-M GEMM behind F.linear is far from the
memory-bandwidth floor; a weight packed once is not (docs/benchmarks.md, "Measurements behind
design choices"). ``CpuWeightPlan`` says which packing a stage uses (``--linear-kernel``,
``--weight-dtype``): ``onednn`` oneDNN's packed matmul; ``panel`` and ``auto`` the panel kernel
at every token count, or oneDNN where the kernel cannot be built. One layout per weight: at
prefill sizes oneDNN was only 5-8% faster than the panel kernel ("CPU linear kernels" in
docs/benchmarks.md), less than a second copy of every weight is worth. Results equal F.linear
to ~1e-6 in fp32. Once packed, the dense copy of the weight is released.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stagekit.kernels import panel_gemm
from stagekit.kernels.panel_gemm import PackStats

log = logging.getLogger(__name__)

# batch-size hint for the oneDNN reorder: measured to suit 1..128 tokens per step
_PACK_HINT = 32

KERNELS = ("auto", "panel", "onednn", "dense")
WEIGHT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class CpuWeightPlan:
    """How fp32 CPU linear weights are packed: ``kernel`` one of KERNELS and ``weight_dtype`` the
    panels' storage dtype (None: fp32). Half-precision storage implies panels."""

    kernel: str = "auto"
    weight_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown linear kernel {self.kernel!r}; allowed: {', '.join(KERNELS)}")
        if self.weight_dtype not in (None, *WEIGHT_DTYPES.values()):
            raise ValueError(f"unsupported panel weight dtype {self.weight_dtype}")
        if self.weight_dtype is not None and self.kernel in ("onednn", "dense"):
            raise ValueError(f"half-precision weights need the panel kernel, not --linear-kernel {self.kernel}")


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


class CpuLinearWeight:
    """One [out, in] fp32 weight packed per a CpuWeightPlan, in exactly one layout: panels
    (``panels``) or oneDNN's (``onednn``). Where the native kernel is unavailable, half-precision
    storage is emulated: the weight is rounded to the half dtype and kept in fp32 for oneDNN
    (the same products, not the memory saving)."""

    def __init__(self, weight: torch.Tensor, plan: CpuWeightPlan) -> None:
        self.out_features = weight.shape[0]
        self.panels: torch.Tensor | None = None
        self.onednn: torch.Tensor | None = None
        self.stats = PackStats()
        if plan.kernel in ("auto", "panel") and panel_gemm.native_available():
            self.panels, self.stats = panel_gemm.pack_panels(weight, plan.weight_dtype or torch.float32)
            return
        if plan.weight_dtype is not None:
            weight, self.stats = panel_gemm.round_weight(weight, plan.weight_dtype)
            weight = weight.float()
        self.onednn = pack_linear_weight(weight)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed layout it holds (what a pass over the weight reads)."""
        w = self.panels if self.panels is not None else self.onednn
        assert w is not None
        return w.numel() * w.element_size()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.panels is not None:
            return panel_gemm.panel_gemm(x, self.panels, self.out_features, bias)
        assert self.onednn is not None
        return packed_linear(x, self.onednn, bias)


class PackedWeight(nn.Module):
    """Mixin for layers whose forward is ``x @ weight.T``: ``pack_weights`` swaps the dense
    weight for a CpuLinearWeight; ``matmul`` uses whichever the layer holds."""

    cpu_weight: CpuLinearWeight | None = None

    def pack_weights(self, plan: CpuWeightPlan = CpuWeightPlan()) -> PackStats | None:
        """Pack per ``plan``; the rounding's stats, or None where nothing was packed."""
        weight = self.weight
        if self.cpu_weight is not None or plan.kernel == "dense" or not packing_supported(weight):
            return None
        self.cpu_weight = CpuLinearWeight(weight.data, plan)
        weight.data = torch.empty(0, dtype=weight.dtype)
        return self.cpu_weight.stats

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        if self.cpu_weight is not None and x.dtype == torch.float32 and x.dim() == 2:
            return self.cpu_weight(x, bias)
        return F.linear(x, self.weight, bias)


def pack_model_weights(model: nn.Module, plan: CpuWeightPlan = CpuWeightPlan()) -> int:
    """Pack every layer of ``model`` that can (PackedWeight layers, and others such as the
    MoE experts that define their own ``pack_weights``); returns how many were packed and
    logs what rounding to a half dtype did (values saturated at its range, flushed to zero)."""
    total, count = PackStats(), 0
    for m in model.modules():
        if callable(getattr(m, "pack_weights", None)):
            stats = m.pack_weights(plan)
            if stats is not None:
                total, count = total + stats, count + 1
    if plan.weight_dtype is not None:
        level = logging.WARNING if total.overflowed or total.flushed else logging.INFO
        log.log(level, "linear weights stored as %s in %d layers: %d values beyond its range (saturated), "
                "%d nonzero values flushed to zero", str(plan.weight_dtype).removeprefix("torch."), count,
                total.overflowed, total.flushed)
    return count
