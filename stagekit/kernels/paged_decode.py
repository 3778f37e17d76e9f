"""Decode attention (one query token per sequence) straight from a paged KV cache.

On the CPU the native kernel (paged_decode.c; fp32, bf16 or fp16 cache, fp32 arithmetic)
reads each sequence's blocks in place, once, for all its query heads. Elsewhere torch
versions copy the context first: on CUDA one gather of the whole batch into a padded
tensor and two batched matmuls (no per-sequence launches); on the CPU without a compiler,
per sequence, a gather of its whole blocks and two small matmuls: several times the
native kernel's time, and a padded batch gather is slower still, because the CPU pays for
every copied byte (docs/benchmarks.md, "Measurements behind design choices").
"""

from __future__ import annotations

import ctypes

import torch

from stagekit.kernels import cpu_build

_c_float_p = ctypes.POINTER(ctypes.c_float)
_c_int_p = ctypes.POINTER(ctypes.c_int32)


_KERNELS = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16", torch.float16: "paged_decode_f16"}


def _lib() -> ctypes.CDLL | None:
    lib = cpu_build.load("paged_decode")
    if lib is not None and not getattr(lib, "_stagemesh_typed", False):
        for name in _KERNELS.values():
            f = getattr(lib, name)
            f.restype = ctypes.c_int
            f.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int, ctypes.c_void_p]
        lib._stagemesh_typed = True
    return lib


def native_available() -> bool:
    return _lib() is not None


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, scale: float, use_native: bool = True) -> torch.Tensor:
    """Attention of one query token per sequence over its cached keys/values.

    q: [B, Hq, D]; k_cache, v_cache: [num_blocks, Hk, block_size, D]; tables: [B, max_blocks]
    int32 (entries past a sequence's blocks are ignored); lens: [B] int32 context lengths
    (>= 1). Returns [B, Hq, D] in q's dtype; query head h uses KV head h // (Hq // Hk).
    """
    B, Hq, D = q.shape
    NB, Hk, BS, _ = k_cache.shape
    kernel = _KERNELS.get(k_cache.dtype)
    if use_native and q.device.type == "cpu" and kernel is not None and B > 0:
        lib = _lib()
        if lib is not None:
            qf = q.float().contiguous()  # fp32 arithmetic whatever the cache holds
            tables = tables.to(torch.int32).contiguous()
            lens = lens.to(torch.int32).contiguous()
            assert k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.dtype == k_cache.dtype
            out = torch.empty_like(qf)
            rc = getattr(lib, kernel)(qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                                      lens.data_ptr(), B, Hq, Hk, D, BS, tables.shape[1], scale,
                                      torch.get_num_threads(), out.data_ptr())
            if rc == 0:
                return out.to(q.dtype)
    if q.device.type == "cpu":
        return _per_sequence(q, k_cache, v_cache, tables, lens, scale)
    return _batched(q, k_cache, v_cache, tables, lens, scale)


def _per_sequence(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                  lens: torch.Tensor, scale: float) -> torch.Tensor:
    B, Hq, D = q.shape
    NB, Hk, BS, _ = k_cache.shape
    out = torch.empty_like(q)
    for i, n in enumerate(lens.tolist()):
        blocks = tables[i, : -(-n // BS)].to(torch.int64)
        keys = k_cache[blocks].transpose(0, 1).reshape(Hk, -1, D)[:, :n]    # [Hk, n, D]
        values = v_cache[blocks].transpose(0, 1).reshape(Hk, -1, D)[:, :n]
        scores = torch.bmm(q[i].view(Hk, -1, D), keys.transpose(1, 2)).float() * scale  # [Hk, G, n]
        out[i] = torch.bmm(torch.softmax(scores, -1).to(q.dtype), values).view(Hq, D)
    return out


def _batched(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
             lens: torch.Tensor, scale: float) -> torch.Tensor:
    B, Hq, D = q.shape
    NB, Hk, BS, _ = k_cache.shape
    max_len = int(lens.max())
    nblk = -(-max_len // BS)
    blocks = tables[:, :nblk].to(device=q.device, dtype=torch.int64)
    keys = k_cache[blocks].transpose(1, 2).reshape(B, Hk, nblk * BS, D)   # [B, Hk, L', D]
    values = v_cache[blocks].transpose(1, 2).reshape(B, Hk, nblk * BS, D)
    qg = q.view(B, Hk, Hq // Hk, D)                                          # [B, Hk, G, D]
    scores = torch.matmul(qg, keys.transpose(2, 3)).float() * scale          # [B, Hk, G, L']
    pad = torch.arange(nblk * BS, device=q.device)[None, :] >= lens.to(q.device)[:, None]  # [B, L']
    scores.masked_fill_(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, values).reshape(B, Hq, D)
