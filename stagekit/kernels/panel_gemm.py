"""Small-batch GEMM on 16-row weight panels (panel_gemm.c), fp32, fp16 or bf16 weights.

A weight [N, K] is packed once by ``pack_panels`` into ``[ceil(N/16), K, 16]`` (rows past N
zero; half precision rounded to nearest even, out-of-range values saturated and counted);
``panel_gemm`` then computes ``x @ W.T + bias`` with fp32 activations and accumulation on
torch's OpenMP threads. Every output is one FMA chain over K in order, so results do not
depend on the thread count or on the other rows of the batch. Calls are serialised: two
Python threads calling at once would run two OpenMP teams on the same cores. Without a C
compiler ``native_available()`` is False and callers keep another path (cpu_packed.py).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from stagekit.kernels import cpu_build

PANEL = 16
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_lock = threading.Lock()


def _lib() -> ctypes.CDLL | None:
    lib = cpu_build.load("panel_gemm")
    if lib is not None and not getattr(lib, "_stagemesh_typed", False):
        lib.panel_gemm.restype = ctypes.c_int
        lib.panel_gemm.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_long] + [ctypes.c_int] * 4
        lib._stagemesh_typed = True
    return lib


def native_available() -> bool:
    return _lib() is not None


@dataclass(frozen=True, slots=True)
class PackStats:
    """What rounding to the panel dtype did to a weight: finite values beyond the dtype's range
    (saturated to its largest finite value) and nonzero values that became zero."""

    overflowed: int = 0
    flushed: int = 0

    def __add__(self, other: PackStats) -> PackStats:
        return PackStats(self.overflowed + other.overflowed, self.flushed + other.flushed)


def round_weight(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, PackStats]:
    """``weight`` in ``dtype`` (round to nearest even), saturating finite out-of-range values."""
    if dtype not in DTYPE_CODES:
        raise ValueError(f"panel weights are float32, float16 or bfloat16, not {dtype}")
    if weight.dtype == dtype:
        return weight, PackStats()
    w = weight.float()
    out = w.to(dtype)
    if dtype == torch.float32:
        return out, PackStats()
    big = torch.finfo(dtype).max
    over = torch.isfinite(w) & (w.abs() > big)
    n_over = int(over.sum())
    if n_over:
        out[over] = torch.where(w[over] > 0, big, -big).to(dtype)
    flushed = int(((out == 0) & (w != 0)).sum())
    return out, PackStats(n_over, flushed)


def pack_panels(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, PackStats]:
    """The panels ``[ceil(N/16), K, 16]`` of an ``[N, K]`` weight, in ``dtype``, and the rounding's stats."""
    if weight.dim() != 2:
        raise ValueError(f"panel packing takes a 2-D [out, in] weight, not shape {tuple(weight.shape)}")
    n, k = weight.shape
    w, stats = round_weight(weight, dtype)
    pad = -n % PANEL
    if pad:
        w = torch.cat([w, w.new_zeros(pad, k)])
    return w.view(-1, PANEL, k).transpose(1, 2).contiguous(), stats


def unpack_panels(panels: torch.Tensor, n: int) -> torch.Tensor:
    """The ``[n, K]`` weight held by ``panels`` (in the panels' dtype)."""
    p, k, _ = panels.shape
    return panels.transpose(1, 2).reshape(p * PANEL, k)[:n]


def panel_gemm(x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for W packed by ``pack_panels``: x [M, K] fp32 (copied first unless its
    rows are contiguous), bias [n] fp32 or None -> [M, n] fp32, written into ``out`` when given
    (a [M, n] fp32 tensor with contiguous rows). Raises RuntimeError where the native kernel is
    unavailable."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("the panel GEMM kernel is not available here (no C compiler, or native kernels off)")
    m, k = x.shape
    if x.stride(1) != 1 or (m > 1 and x.stride(0) < k):
        x = x.contiguous()
    if (x.dtype != torch.float32 or not panels.is_contiguous() or panels.shape[1] != k
            or panels.shape[2] != PANEL or not 0 < n <= panels.shape[0] * PANEL):
        raise ValueError(f"panel_gemm: x {tuple(x.shape)} {x.dtype} does not fit panels {tuple(panels.shape)}")
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32)
    elif out.shape != (m, n) or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"panel_gemm: out must be [{m}, {n}] fp32 with contiguous rows")
    if bias is not None:
        if bias.numel() != n:
            raise ValueError(f"panel_gemm: bias has {bias.numel()} values for {n} outputs")
        bias = bias.float().contiguous()
    if m == 0:
        return out
    with _lock:
        rc = lib.panel_gemm(x.data_ptr(), x.stride(0) if m > 1 else k, panels.data_ptr(), DTYPE_CODES[panels.dtype],
                            None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0), m, n, k,
                            torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"panel_gemm rejected shapes M={m} N={n} K={k}")
    return out
