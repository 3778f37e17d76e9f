"""A MoE layer's routed experts in one native call (moe_experts.c).

``ExpertPanels`` holds the pointers to every local expert's packed gate/up and down panels
(panel_gemm.pack_panels) and keeps the tensors alive; ``run`` computes the routed output of
one layer's (token, choice) pairs, sorted by expert by the caller, in one OpenMP region. The
intermediate buffers live in one module-level scratch, grown to the largest call seen and
used only under panel_gemm's lock, which every call holds: two OpenMP teams on the same
cores would fight each other. ``STAGEMESH_FUSED_LAYER=0`` turns this call off with the fused
decoder layer (``enabled``); without a C compiler ``native_available()`` is False.
"""

from __future__ import annotations

import ctypes

import torch

from stagekit.kernels import cpu_build, fused_layer
from stagekit.kernels.panel_gemm import DTYPE_CODES, PANEL
from stagekit.kernels.panel_gemm import _lock as native_lock

_p = ctypes.c_void_p
SCRATCH_BYTES = 64 << 20  # the most row buffers one call may need (pairs_per_call)


class _Args(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("T", "H", "I", "E", "wdt", "N", "rpt", "k")] + [
        (n, _p) for n in ("x", "order", "bounds", "w13", "w2", "weights", "xs", "gu", "act", "ys", "pos", "out")]


def _lib() -> ctypes.CDLL | None:
    lib = cpu_build.load("moe_experts")
    if lib is not None and not getattr(lib, "_stagemesh_typed", False):
        lib.moe_experts.restype = ctypes.c_int
        lib.moe_experts.argtypes = [_p, ctypes.c_int]
        lib._stagemesh_typed = True
    return lib


def native_available() -> bool:
    return _lib() is not None


def enabled() -> bool:
    """False where the user turned the fused decoder layer off: this call goes with it."""
    return fused_layer.enabled()


class ExpertPanels:
    """The panels of E local experts as the kernel reads them: w13 of [2I, H] (gate rows then
    up rows) and w2 of [H, I] per expert, all of one dtype and contiguous (checked here).
    Invariant: the tensors the pointer arrays point to are held by this object."""

    def __init__(self, w13: list[torch.Tensor], w2: list[torch.Tensor], hidden: int, intermediate: int) -> None:
        if len(w13) != len(w2) or not w13:
            raise ValueError("moe experts: one w13 and one w2 panel set per local expert")
        h, i, dtype = hidden, intermediate, w13[0].dtype
        for panels, n, k in [(p, 2 * i, h) for p in w13] + [(p, h, i) for p in w2]:
            if (panels.dtype != dtype or dtype not in DTYPE_CODES or not panels.is_contiguous()
                    or panels.device.type != "cpu" or tuple(panels.shape) != (-(-n // PANEL), k, PANEL)):
                raise ValueError(f"moe experts: panels {tuple(panels.shape)} {panels.dtype} do not fit [{n}, {k}] "
                                 f"in {dtype}")
        self._keep = (list(w13), list(w2))
        self.num_experts, self.hidden, self.intermediate, self.dtype = len(w13), h, i, dtype
        self.w13 = (_p * len(w13))(*[p.data_ptr() for p in w13])
        self.w2 = (_p * len(w2))(*[p.data_ptr() for p in w2])


def pairs_per_call(panels: ExpertPanels) -> int:
    """How many pairs one call may compute: its buffers hold [pairs, 2H + 3I] fp32 for all of
    them at once (a long prefill of a large model would otherwise keep gigabytes around)."""
    return max(1, SCRATCH_BYTES // (4 * (2 * panels.hidden + 3 * panels.intermediate)))


class _Scratch:
    """One fp32 arena for the kernel's row buffers and one int64 arena for ``pos``, grown to the
    largest call seen (never shrunk); used only under the lock."""

    def __init__(self) -> None:
        self.floats = torch.empty(0)
        self.ints = torch.empty(0, dtype=torch.int64)

    def views(self, rows: int, pairs: int, h: int, i: int) -> list[int]:
        widths = (h, 2 * i, i, h)  # xs, gu, act, ys per computed row
        if rows * sum(widths) > self.floats.numel():
            self.floats = torch.empty(rows * sum(widths), dtype=torch.float32)
        if pairs > self.ints.numel():
            self.ints = torch.empty(pairs, dtype=torch.int64)
        out, off = [], self.floats.data_ptr()
        for w in widths:
            out.append(off)
            off += rows * w * 4
        return [*out, self.ints.data_ptr()]


_scratch = _Scratch()


def run(panels: ExpertPanels, x: torch.Tensor, order: torch.Tensor, bounds: torch.Tensor,
        weights: torch.Tensor | None, rows_per_token: int, combine: int, out: torch.Tensor | None = None
        ) -> torch.Tensor:
    """The routed output of N pairs: pair i is token ``i // rows_per_token`` of x [T, H] fp32
    through the local expert whose sorted range ``bounds`` [E + 1] puts it in (``order`` [N]:
    the stable sort of the pairs by local slot), times ``weights[i]`` [N] fp32 when given, zero
    where its expert is held elsewhere. Returns [N // combine, H] fp32: row t the sum of pairs
    t*combine .. t*combine + combine - 1, added in that order, written into ``out`` when given
    (contiguous). Raises RuntimeError where the kernel is unavailable, ValueError for arguments
    it does not take."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("the MoE experts kernel is not available here (no C compiler, or native kernels off)")
    h, i, e = panels.hidden, panels.intermediate, panels.num_experts
    n = order.numel()
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != h or x.device.type != "cpu":
        raise ValueError(f"moe experts: x {tuple(x.shape)} {x.dtype} is not fp32 [T, {h}] on the CPU")
    if weights is not None and (weights.dtype != torch.float32 or weights.numel() != n):
        raise ValueError(f"moe experts: weights must be {n} fp32 values")
    if bounds.numel() != e + 1 or n % combine:
        raise ValueError(f"moe experts: {bounds.numel()} bounds for {e} experts, or {n} pairs not in groups "
                         f"of {combine}")
    if out is None:
        out = torch.empty(n // combine, h, dtype=torch.float32)
    elif out.shape != (n // combine, h) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"moe experts: out must be contiguous fp32 [{n // combine}, {h}]")
    if n == 0:
        return out
    x = x.contiguous()
    order = order.to(torch.int64).contiguous()
    bounds = bounds.to(torch.int64).contiguous()
    weights = None if weights is None else weights.contiguous()
    rows = max(int(bounds[e]), 0)  # the kernel rejects bounds out of range before it touches the scratch
    with native_lock:
        args = _Args(x.shape[0], h, i, e, DTYPE_CODES[panels.dtype], n, rows_per_token, combine, x.data_ptr(),
                     order.data_ptr(), bounds.data_ptr(), ctypes.addressof(panels.w13), ctypes.addressof(panels.w2),
                     None if weights is None else weights.data_ptr(), *_scratch.views(rows, n, h, i), out.data_ptr())
        rc = lib.moe_experts(ctypes.addressof(args), torch.get_num_threads())
    if rc != 0:
        raise ValueError("moe experts: the routing does not fit the kernel (bounds or order out of range)")
    return out
