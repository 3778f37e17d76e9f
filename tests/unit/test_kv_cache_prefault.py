"""``--kv-prefault``: a host KV pool is resident (and zero) from start-up; without it its
pages stay unmapped until first written."""

from __future__ import annotations

import os

import torch

from stagekit.kv.kv_cache import PagedKVCache

POOL_BYTES = 64 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _pool(prefault: bool) -> PagedKVCache:
    # 4 layers x 2 x 512 blocks x 4 heads x 16 x 64 x 4 B = 64 MiB
    return PagedKVCache(4, 4, 64, torch.float32, torch.device("cpu"), 512, 16, prefault=prefault)


def test_prefaulted_pool_is_resident_and_zero() -> None:
    before = _rss()
    cache = _pool(True)
    assert cache.kv.numel() * 4 == POOL_BYTES
    assert _rss() - before > 0.9 * POOL_BYTES
    assert not cache.kv.any()


def test_lazy_pool_maps_pages_on_first_write() -> None:
    before = _rss()
    cache = _pool(False)
    assert _rss() - before < 0.25 * POOL_BYTES
    cache.kv[:, :, :256].fill_(1.0)   # half the blocks of every layer
    grown = _rss() - before
    assert 0.4 * POOL_BYTES < grown < 0.75 * POOL_BYTES
