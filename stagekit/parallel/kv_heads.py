"""Which KV heads a TP rank holds, and KV blocks re-split from one TP size to another.

KV heads are split over the ranks when there are at least as many heads as ranks (rank r
of t holds heads ``r * H / t`` up to the next rank's first) and replicated when there are
fewer (``t % H == 0``: rank r holds head ``r * H // t``), as the QKV projection lays them
out (``layers/linear.py``). A KV transfer between stages of different TP sizes takes every
head once from a rank that holds it and hands each destination rank its own heads.

Transferred KV is ``[layers, 2, blocks, H, block_size, head_dim]`` from a TP1 stage and
``[t, layers, 2, blocks, heads per rank, block_size, head_dim]`` (rank order) from a stage
of t > 1 ranks.
"""

from __future__ import annotations

import torch


def check_tp(tp_size: int, num_kv_heads: int) -> None:
    """ValueError unless ``tp_size`` ranks can hold ``num_kv_heads`` KV heads (one divides the other)."""
    if tp_size < 1 or num_kv_heads < 1 or (num_kv_heads % tp_size and tp_size % num_kv_heads):
        raise ValueError(f"{tp_size} TP ranks cannot hold {num_kv_heads} KV heads: one must divide the other")


def kv_heads_of(rank: int, tp_size: int, num_kv_heads: int) -> range:
    """The global KV heads rank ``rank`` of ``tp_size`` holds."""
    check_tp(tp_size, num_kv_heads)
    first = rank * num_kv_heads // tp_size
    return range(first, first + max(1, num_kv_heads // tp_size))


def transfer_shape(tp_size: int, num_kv_heads: int, layers: int, blocks: int, block_size: int,
                   head_dim: int) -> tuple[int, ...]:
    """The shape of ``blocks`` KV blocks as a stage of ``tp_size`` ranks transfers them."""
    check_tp(tp_size, num_kv_heads)
    shape = (layers, 2, blocks, max(1, num_kv_heads // tp_size), block_size, head_dim)
    return shape if tp_size == 1 else (tp_size, *shape)


def resplit_kv(data: torch.Tensor, src_tp: int, dst_tp: int, num_kv_heads: int) -> torch.Tensor:
    """KV as a stage of ``src_tp`` ranks transferred it, laid out for a stage of ``dst_tp``
    ranks (a new contiguous tensor; ``data`` itself when the sizes agree)."""
    check_tp(src_tp, num_kv_heads)
    check_tp(dst_tp, num_kv_heads)
    if src_tp == dst_tp:
        return data
    x = data.unsqueeze(0) if src_tp == 1 else data   # [src_tp, layers, 2, blocks, heads per rank, bs, d]
    if x.dim() != 7 or x.shape[0] != src_tp or x.shape[4] != max(1, num_kv_heads // src_tp):
        raise ValueError(f"KV of shape {tuple(data.shape)} is not what a stage of TP={src_tp} with "
                         f"{num_kv_heads} KV heads transfers")
    holder = {}   # global head -> (source rank, its index there): the first rank holding it
    for r in range(src_tp):
        for j, g in enumerate(kv_heads_of(r, src_tp, num_kv_heads)):
            holder.setdefault(g, (r, j))
    ranks = torch.tensor([holder[g][0] for g in range(num_kv_heads)])
    local = torch.tensor([holder[g][1] for g in range(num_kv_heads)])
    full = x.permute(0, 4, 1, 2, 3, 5, 6)[ranks, local]   # [H, layers, 2, blocks, bs, d]
    heads = [kv_heads_of(r, dst_tp, num_kv_heads) for r in range(dst_tp)]
    out = torch.stack([full[h.start:h.stop] for h in heads])   # [dst_tp, heads per rank, layers, 2, blocks, bs, d]
    out = out.permute(0, 2, 3, 4, 1, 5, 6).contiguous()   # [dst_tp, layers, 2, blocks, heads per rank, bs, d]
    return out[0] if dst_tp == 1 else out
