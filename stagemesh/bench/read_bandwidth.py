"""The machine's read bandwidth, measured now: the rate at which ``torch.sum`` streams a buffer
much larger than the caches with a given number of threads. A decode step at small batch reads
every weight once, so this is its floor: weight bytes / bandwidth."""

from __future__ import annotations

import statistics
import time

import torch


def read_bandwidth(threads: int, nbytes: int = 256 << 20, repeats: int = 9) -> float:
    """Bytes/s of a sum over an ``nbytes`` fp32 buffer with ``threads`` torch threads (the
    median of ``repeats``); torch's thread count is restored afterwards."""
    if threads < 1 or nbytes < 4 or repeats < 1:
        raise ValueError(f"read_bandwidth: threads {threads}, nbytes {nbytes}, repeats {repeats}: all must be >= 1")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf = torch.ones(nbytes // 4, dtype=torch.float32)  # written once: every page is resident
        buf.sum()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            buf.sum()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return buf.numel() * 4 / statistics.median(times)
