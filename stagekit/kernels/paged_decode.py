"""Decode attention (one query token per sequence) straight from a paged KV cache.

On the CPU in fp32 the native kernel (paged_decode.c) reads each sequence's blocks in
place, once, for all its query heads. Elsewhere (CUDA, fp16/bf16, no compiler) a torch
version gathers the blocks of the whole batch into one padded tensor and runs two
batched matmuls: one copy of the context per layer, but no per-sequence Python.
"""

from __future__ import annotations

import ctypes

import torch

from stagekit.kernels import cpu_build

_c_float_p = ctypes.POINTER(ctypes.c_float)
_c_int_p = ctypes.POINTER(ctypes.c_int32)


def _lib() -> ctypes.CDLL | None:
    lib = cpu_build.load("paged_decode")
    if lib is not None and not getattr(lib, "_stagemesh_typed", False):
        f = lib.paged_decode_f32
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int, ctypes.c_void_p]
        lib._stagemesh_typed = True
    return lib


def native_available() -> bool:
    return _lib() is not None


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, scale: float, use_native: bool = True) -> torch.Tensor:
    """Attention of one query token per sequence over its cached keys/values.

    q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hk, D]; tables: [B, max_blocks]
    int32 (entries past a sequence's blocks are ignored); lens: [B] int32 context lengths
    (>= 1). Returns [B, Hq, D]; query head h uses KV head h // (Hq // Hk).
    """
    B, Hq, D = q.shape
    NB, BS, Hk, _ = k_cache.shape
    if use_native and q.device.type == "cpu" and q.dtype == torch.float32 and B > 0:
        lib = _lib()
        if lib is not None:
            q = q.contiguous()
            tables = tables.to(torch.int32).contiguous()
            lens = lens.to(torch.int32).contiguous()
            assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == torch.float32
            out = torch.empty_like(q)
            rc = lib.paged_decode_f32(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                                      lens.data_ptr(), B, Hq, Hk, D, BS, tables.shape[1], scale,
                                      torch.get_num_threads(), out.data_ptr())
            if rc == 0:
                return out
    return _torch_paged_decode(q, k_cache, v_cache, tables, lens, scale)


def _torch_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                        lens: torch.Tensor, scale: float) -> torch.Tensor:
    B, Hq, D = q.shape
    NB, BS, Hk, _ = k_cache.shape
    max_len = int(lens.max())
    nblk = -(-max_len // BS)
    tables = tables[:, :nblk].to(torch.int64)
    slots = (tables[:, :, None] * BS + torch.arange(BS, device=q.device)).reshape(B, -1)[:, :max_len]  # [B, L]
    keys = k_cache.view(NB * BS, Hk, D)[slots]            # [B, L, Hk, D]
    values = v_cache.view(NB * BS, Hk, D)[slots]
    qg = q.view(B, Hk, Hq // Hk, D)                       # [B, Hk, G, D]
    scores = torch.einsum("bkgd,blkd->bkgl", qg, keys).float() * scale
    pad = torch.arange(max_len, device=q.device)[None, :] >= lens.to(q.device)[:, None]  # [B, L]
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.einsum("bkgl,blkd->bkgd", probs, values).reshape(B, Hq, D)
