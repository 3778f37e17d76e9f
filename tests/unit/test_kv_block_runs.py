"""KV transfer moves blocks as runs of consecutive ids (one UCX part, one strided copy each)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from services.stage import kv_blocks
from services.stage.kv_blocks import joint_runs
from stagekit.kv.kv_cache import PagedKVCache
from stagekit.kv.kv_cache import block_runs as runs


def test_runs_of_consecutive_blocks() -> None:
    assert runs([]) == []
    assert runs([4, 5, 6]) == [(0, 4, 3)]
    assert runs([9, 8, 7]) == [(0, 9, 1), (1, 8, 1), (2, 7, 1)]
    assert runs([1, 2, 7, 3, 4, 5]) == [(0, 1, 2), (2, 7, 1), (3, 3, 3)]


def test_joint_runs_break_where_either_side_does() -> None:
    assert joint_runs([4, 5, 6, 9], [0, 1, 5, 6]) == [(0, 4, 0, 2), (2, 6, 5, 1), (3, 9, 6, 1)]
    assert joint_runs([], []) == []


def _node(num_blocks: int, seed: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(3, 2, num_blocks, 2, 4, 8, generator=g)  # [layers, 2, blocks, kv_heads, block_size, head_dim]
    cache = PagedKVCache(3, 2, 8, torch.float32, torch.device("cpu"), num_blocks, 4)
    cache.kv.copy_(pool)
    return SimpleNamespace(runtime=SimpleNamespace(kv_cache=cache), layout=SimpleNamespace(tp_size=1))


def test_parts_land_in_place_in_the_receivers_blocks() -> None:
    src, dst = [3, 4, 5, 9, 1], [7, 8, 2, 3, 4]
    sender, receiver = _node(12, 0), _node(10, 1)
    parts = kv_blocks.parts(sender, src, dst)
    part_bytes = tuple(p.numel() * p.element_size() for p in parts)
    views = kv_blocks.landing(receiver, dst, part_bytes)
    assert views is not None and len(views) == len(parts)
    for p, v in zip(parts, views, strict=True):
        assert v.data_ptr() >= receiver.runtime.kv_cache.kv.data_ptr() and v.is_contiguous()
        v.copy_(p)   # what the UCX receive does
    got = receiver.runtime.kv_cache.kv[:, :, dst]
    assert torch.equal(got, sender.runtime.kv_cache.kv[:, :, src])
    # the same bytes in order make the transferred tensor (the staged path's layout)
    joined = torch.cat([p.reshape(-1) for p in parts])
    assert torch.equal(joined, kv_blocks.read(sender, src).reshape(-1))


def test_parts_that_do_not_line_up_are_staged() -> None:
    receiver = _node(10, 1)
    block = 2 * 4 * 8 * 4   # bytes of one block of one layer's K or V
    assert kv_blocks.landing(receiver, [1, 2], (3 * 2 * 2 * block,)) is None        # one gathered tensor
    assert kv_blocks.landing(receiver, [1, 5], (2 * block,) * 6) is None            # 5 does not follow 1
    assert kv_blocks.landing(receiver, [1, 2], (block,) * 5) is None                # not per layer and K/V
    assert kv_blocks.landing(receiver, [1, 2], (block, block) * 6) is not None
