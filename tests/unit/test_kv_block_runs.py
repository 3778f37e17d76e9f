"""KV transfer moves blocks as runs of consecutive ids (one UCX part, one strided copy each), and a
receiver accepts only what fits its pool."""

from __future__ import annotations

import pytest
import torch

from stagekit.errors import InvalidRequest
from stagekit.kv.block_io import BlockIO, joint_runs
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


def _pool(num_blocks: int, seed: int) -> BlockIO:
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(3, 2, num_blocks, 2, 4, 8, generator=g)  # [layers, 2, blocks, kv_heads, block_size, head_dim]
    cache = PagedKVCache(3, 2, 8, torch.float32, torch.device("cpu"), num_blocks, 4)
    cache.kv.copy_(pool)
    return BlockIO(cache, num_kv_heads=2, tp_size=1, start_layer=0, end_layer=3)


def test_parts_joined_are_the_transferred_tensor() -> None:
    src, dst = [3, 4, 5, 9, 1], [7, 8, 2, 3, 4]
    sender, receiver = _pool(12, 0), _pool(10, 1)
    parts = sender.parts(src, dst)
    assert all(p.data_ptr() >= sender.kv.kv.data_ptr() and p.is_contiguous() for p in parts)   # views, no copy
    joined = torch.cat([p.reshape(-1) for p in parts])       # what the receiver's staging tensor holds
    assert torch.equal(joined, sender.read(src).reshape(-1))
    receiver.write(dst, joined.view(sender.shape(len(src))))
    assert torch.equal(receiver.kv.kv[:, :, dst], sender.kv.kv[:, :, src])


def test_an_announcement_is_accepted_only_if_it_fits_the_pool() -> None:
    receiver = _pool(10, 1)   # layers 0:3, 2 KV heads, blocks of 4 tokens, head_dim 8, float32
    fits = receiver.accept([1, 2], torch.float32, (3, 2, 2, 2, 4, 8), 1, 0, 3)
    assert fits.nbytes == 3 * 2 * 2 * 2 * 4 * 8 * 4 and fits.src_tp == 1
    assert receiver.accept([1, 2], torch.float32, (2, 3, 2, 2, 1, 4, 8), 2, 0, 3).shape == (2, 3, 2, 2, 1, 4, 8)
    for bad, needle in [
        (([1, 2], torch.float32, (3, 2, 2, 2, 4, 8), 1, 1, 4), "layers 1:4"),
        (([1, 2], torch.float16, (3, 2, 2, 2, 4, 8), 1, 0, 3), "does not fit"),
        (([1, 2], torch.float32, (3, 2, 3, 2, 4, 8), 1, 0, 3), "does not fit"),
        (([1, 10], torch.float32, (3, 2, 2, 2, 4, 8), 1, 0, 3), "outside"),
        (([1, 2], torch.float32, (3, 3, 2, 2, 1, 4, 8), 3, 0, 3), "TP=3"),
    ]:
        with pytest.raises(InvalidRequest, match=needle):
            receiver.accept(*bad)
