"""Host memory for received tensors, reused once nothing references it any more.

A large allocation is a fresh mmap: every frame would page-fault (and zero) all of its
memory before UCX could write a byte, which caps 64 MiB frames at a fraction of the
copy bandwidth. The pool keeps flat byte buffers and lends views of them; a buffer is
free again when its storage has no user besides the pool (the returned tensor, its views
and the numpy arrays made from them all hold the storage). Small tensors come from the
allocator directly, CUDA tensors from torch's caching allocator.
"""

from __future__ import annotations

import torch

MIN_POOLED_BYTES = 1 << 20
_use_count = getattr(torch._C, "_storage_Use_Count", None)


class RecvPool:
    """Invariant: a buffer is lent out only while the pool is its storage's sole user, and
    the buffers idle in the pool total at most ``max_idle_bytes``."""

    def __init__(self, max_idle_bytes: int = 512 << 20) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._buffers: dict[int, list[torch.Tensor]] = {}   # nbytes -> flat uint8 buffers
        self.allocated = self.reused = 0

    @staticmethod
    def _free(buf: torch.Tensor) -> bool:
        # the pool's tensor and the temporary storage object: no one else
        return _use_count(buf.untyped_storage()._cdata) <= 2

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised host tensor of ``shape`` and ``dtype``; contiguous."""
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if _use_count is None or nbytes < MIN_POOLED_BYTES:
            return torch.empty(shape, dtype=dtype)
        same = self._buffers.setdefault(nbytes, [])
        buf = next((b for b in same if self._free(b)), None)
        if buf is None:
            self._trim()
            buf = torch.empty(nbytes, dtype=torch.uint8)
            same.append(buf)
            self.allocated += 1
        else:
            self.reused += 1
        return buf.view(dtype).view(shape)

    def _trim(self) -> None:
        """Drop idle buffers beyond the budget, largest first."""
        idle = sorted(((n, b) for n, bufs in self._buffers.items() for b in bufs if self._free(b)),
                      key=lambda nb: -nb[0])
        total = sum(n for n, _ in idle)
        for n, b in idle:
            if total <= self.max_idle_bytes:
                break
            self._buffers[n] = [x for x in self._buffers[n] if x is not b]
            total -= n
