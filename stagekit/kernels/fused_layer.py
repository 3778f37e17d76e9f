"""One decode step of a dense Llama-family decoder layer in one native call (fused_layer.c).

``FusedLayerWeights`` holds one layer's pointers (panels from panel_gemm.pack_panels, norms,
biases, RoPE caches) and keeps the tensors alive; ``DecodeStep`` holds what every layer of a
step shares (positions, KV slots, block tables, the KV pool) and the scratch buffers, which
belong to a ``Scratch`` reused from step to step (grown, never shrunk); ``DecodeStep.run`` runs
one layer, or one half of it (ATTENTION, MLP: a tensor-parallel caller all-reduces in between; a
layer whose MLP the kernel does not run, e.g. a MoE block, takes ATTENTION only). Calls hold
panel_gemm's lock: two OpenMP teams on the same cores would fight each other. ctypes releases
the GIL for the call. Without a C compiler ``native_available()`` is False.
"""

from __future__ import annotations

import ctypes
import os

import torch

from stagekit.kernels import cpu_build
from stagekit.kernels.panel_gemm import DTYPE_CODES, PANEL
from stagekit.kernels.panel_gemm import _lock as native_lock

# "0" turns the fused native calls off: decoder layers (models/fused_decode.py) and MoE experts (moe_experts.py)
ENV = "STAGEMESH_FUSED_LAYER"
ATTENTION, MLP, BOTH = 1, 2, 3
# paged_decode.c's fixed bounds
MAX_GROUP, MAX_BLOCK, MAX_DIM = 64, 256, 1024

_p = ctypes.c_void_p


class _Layer(ctypes.Structure):
    _fields_ = [("H", ctypes.c_int), ("Hq", ctypes.c_int), ("Hk", ctypes.c_int), ("D", ctypes.c_int),
                ("I", ctypes.c_int), ("wdt", ctypes.c_int), ("max_pos", ctypes.c_int), ("eps", ctypes.c_float),
                ("scale", ctypes.c_float), ("norm1", _p), ("norm2", _p), ("qkv_w", _p), ("qkv_b", _p), ("o_w", _p),
                ("o_b", _p), ("gu_w", _p), ("down_w", _p), ("cos", _p), ("sin", _p)]


class _Step(ctypes.Structure):
    _fields_ = [("B", ctypes.c_int), ("BS", ctypes.c_int), ("max_blocks", ctypes.c_int), ("positions", _p),
                ("wblocks", _p), ("wrows", _p), ("tables", _p), ("lens", _p), ("xn", _p), ("qkv", _p), ("q", _p),
                ("attn", _p), ("o", _p), ("gu", _p), ("act", _p)]


def _lib() -> ctypes.CDLL | None:
    lib = cpu_build.load("fused_layer")
    if lib is not None and not getattr(lib, "_stagemesh_typed", False):
        lib.fused_layer.restype = ctypes.c_int
        lib.fused_layer.argtypes = [_p] * 8 + [ctypes.c_int, ctypes.c_int]
        lib._stagemesh_typed = True
    return lib


def native_available() -> bool:
    return _lib() is not None


def enabled() -> bool:
    """False where the user turned the fused native calls off (``STAGEMESH_FUSED_LAYER=0``)."""
    return os.environ.get(ENV, "1") != "0"


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class FusedLayerWeights:
    """One layer's weights as the kernel reads them: four panel sets of one dtype, fp32 norms,
    biases and cos/sin caches, all contiguous (checked here). Without ``norm2``, ``gate_up`` and
    ``down`` (all three None, ``intermediate`` 0) it holds the attention half only (``has_mlp``
    False: a layer whose MLP the caller runs, e.g. a MoE block), and ``DecodeStep.run`` takes only
    the ATTENTION phase with it. Invariant: the tensors it points to are held by this object for
    its lifetime."""

    def __init__(self, *, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, intermediate: int,
                 eps: float, scale: float, norm1: torch.Tensor, norm2: torch.Tensor | None, qkv: torch.Tensor,
                 qkv_bias: torch.Tensor | None, o: torch.Tensor, o_bias: torch.Tensor | None,
                 gate_up: torch.Tensor | None, down: torch.Tensor | None, cos: torch.Tensor,
                 sin: torch.Tensor) -> None:
        h, hq, hk, d, i = hidden, num_heads, num_kv_heads, head_dim, intermediate
        mlp = (norm2, gate_up, down)
        if any(t is None for t in mlp) and (any(t is not None for t in mlp) or i != 0):
            raise ValueError("fused layer: norm2, gate_up and down come together (or none, with intermediate 0)")
        self.has_mlp = gate_up is not None
        shapes = {"qkv": (qkv, (hq + 2 * hk) * d, h), "o": (o, h, hq * d)}
        if gate_up is not None and down is not None:
            shapes.update({"gate_up": (gate_up, 2 * i, h), "down": (down, h, i)})
        for name, (panels, n, k) in shapes.items():
            if (panels.dtype != qkv.dtype or panels.dtype not in DTYPE_CODES or not panels.is_contiguous()
                    or tuple(panels.shape) != (-(-n // PANEL), k, PANEL)):
                raise ValueError(f"fused layer: {name} panels {tuple(panels.shape)} {panels.dtype} do not fit "
                                 f"[{n}, {k}] in {qkv.dtype}")
        if hk <= 0 or hq % hk or hq // hk > MAX_GROUP or d > MAX_DIM or d % 2:
            raise ValueError(f"fused layer: {hq} query heads over {hk} KV heads of dim {d} are not supported")
        f32 = [norm1, cos, sin] + [t for t in (norm2, qkv_bias, o_bias) if t is not None]
        if any(t.dtype != torch.float32 or not t.is_contiguous() for t in f32) or cos.shape[1] != d:
            raise ValueError("fused layer: norms, biases and cos/sin must be contiguous fp32")
        self._keep = (norm1, norm2, qkv, qkv_bias, o, o_bias, gate_up, down, cos, sin)
        self.hidden, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate = h, hq, hk, d, i
        self.max_position = cos.shape[0]
        self.struct = _Layer(h, hq, hk, d, i, DTYPE_CODES[qkv.dtype], cos.shape[0], eps, scale, _ptr(norm1),
                             _ptr(norm2), _ptr(qkv), _ptr(qkv_bias), _ptr(o), _ptr(o_bias), _ptr(gate_up),
                             _ptr(down), _ptr(cos), _ptr(sin))
        self.ref = ctypes.addressof(self.struct)

        self.dims = (h, hq, hk, d, i)


class Scratch:
    """The kernel's intermediate buffers for layers of one shape, reused across calls and steps:
    one fp32 arena grown to the largest batch seen."""

    def __init__(self, dims: tuple[int, int, int, int, int]) -> None:
        self.dims = dims
        h, hq, hk, d, i = dims
        # xn, qkv, q, attn, o, gu, act per row
        self.widths = (h, (hq + 2 * hk) * d, hq * d, hq * d, h, 2 * i, i)
        self.rows = 0
        self.arena = torch.empty(0)

    def views(self, b: int) -> list[int]:
        if b > self.rows:
            self.rows = b
            self.arena = torch.empty(b * sum(self.widths), dtype=torch.float32)
        out, off = [], self.arena.data_ptr()
        for w in self.widths:
            out.append(off)
            off += b * w * 4
        return out


class DecodeStep:
    """What all layers of one decode step share: B rows, one per sequence, at ``positions``;
    each row's KV slot (``write_blocks``, ``write_rows``); the block tables and context lengths
    (new token included) that attention reads; the stage's KV pool ([layers, 2, num_blocks,
    Hk, block_size, D] fp32, contiguous: checked here); and a Scratch of the layers' shape.
    ``fits`` says whether a layer's weights match it (shapes, positions within its RoPE cache)."""

    def __init__(self, positions: torch.Tensor, write_blocks: torch.Tensor, write_rows: torch.Tensor,
                 tables: torch.Tensor, lens: torch.Tensor, kv_pool: torch.Tensor, scratch: Scratch) -> None:
        lib = _lib()
        if lib is None:
            raise RuntimeError("the fused layer kernel is not available here (no C compiler, or native kernels off)")
        self.lib = lib
        _, hq, hk, d, _ = scratch.dims
        if (kv_pool.dim() != 6 or kv_pool.shape[1] != 2 or kv_pool.shape[3] != hk or kv_pool.shape[5] != d
                or kv_pool.dtype != torch.float32 or not kv_pool.is_contiguous()):
            raise ValueError(f"fused layer: the KV pool {tuple(kv_pool.shape)} {kv_pool.dtype} is not contiguous fp32 "
                             f"[layers, 2, blocks, {hk}, block_size, {d}]")
        self.b = int(positions.numel())
        self._keep = (positions.to(torch.int64).contiguous(), write_blocks.to(torch.int64).contiguous(),
                      write_rows.to(torch.int64).contiguous(), tables.to(torch.int32).contiguous(),
                      lens.to(torch.int32).contiguous(), kv_pool)
        self.max_position = int(positions.max()) if self.b else 0
        self.block_size = kv_pool.shape[4]
        self.num_layers = kv_pool.shape[0]
        self._kv_base = kv_pool.data_ptr()
        self._layer_bytes, self._v_bytes = kv_pool.stride(0) * 4, kv_pool.stride(1) * 4
        self.dims = scratch.dims
        pos, wb, wr, tab, ln, _ = self._keep
        views = scratch.views(self.b)
        self._arena = scratch.arena  # kept: a later, larger step may replace the scratch's arena
        self.struct = _Step(self.b, self.block_size, tab.shape[1], pos.data_ptr(), wb.data_ptr(), wr.data_ptr(),
                            tab.data_ptr(), ln.data_ptr(), *views)
        self._ref = ctypes.addressof(self.struct)

    def fits(self, weights: FusedLayerWeights) -> bool:
        return (self.max_position < weights.max_position and self.block_size <= MAX_BLOCK and self.b > 0
                and self.dims == weights.dims)

    def run(self, weights: FusedLayerWeights, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None,
            phases: int = BOTH) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``phases`` of the layer whose KV is the pool's ``layer`` for the step's B rows:
        hidden, residual [B, H] fp32 (residual None on a stage's first layer) -> (out, residual')
        as fused_layer.c describes. ``weights`` must fit the step (``fits``)."""
        if not self.fits(weights):
            raise ValueError(f"fused layer: weights of shape {weights.dims} do not fit this step")
        if phases != ATTENTION and not weights.has_mlp:
            raise ValueError("fused layer: these weights hold the attention half only")
        b, h = self.b, weights.hidden
        for t in (hidden, residual):
            if t is not None and (t.shape != (b, h) or t.dtype != torch.float32 or not t.is_contiguous()):
                raise ValueError(f"fused layer: activations must be contiguous fp32 [{b}, {h}]")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"fused layer: KV layer {layer} is outside the pool's {self.num_layers}")
        out = torch.empty(b, h, dtype=torch.float32)
        res_out = torch.empty(b, h, dtype=torch.float32)
        k = self._kv_base + layer * self._layer_bytes
        with native_lock:
            rc = self.lib.fused_layer(weights.ref, self._ref, k, k + self._v_bytes, hidden.data_ptr(),
                                      None if residual is None else residual.data_ptr(), out.data_ptr(),
                                      res_out.data_ptr(), phases, torch.get_num_threads())
        if rc != 0:
            raise ValueError("fused layer: shapes outside the kernel's bounds")
        return out, res_out
