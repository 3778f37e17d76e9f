"""This stage's side of a KV transfer, whichever path the bytes take: the announcement a
sender makes and its check against the pool (protobuf), and reads and writes of blocks on
every TP rank of the stage.

The announcement is a ``KvBlocksChunk`` without data: the gRPC path sends it as its first
chunk, the UCX path as the header of its one message. On a TP stage the blocks are read
and written by all ranks together on the stage's compute thread (``TPExecutor.read_kv`` /
``write_kv``), so the ranks' collectives take turns with the steps'. Between stages of the
same TP size rank r's heads go into rank r's pool as they are (split or replicated alike);
from a stage of another TP size the receiver re-splits the heads for its own ranks first.
The torch-level block code is ``stagekit/kv/block_io.py``.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from stagekit.engine.stage_runtime import StageRuntime
from stagekit.engine.tp_executor import TPExecutor
from stagekit.errors import DeadlineExceeded
from stagekit.kv.block_io import BlockIO, Incoming
from stagekit.rpc import stage_proto
from stagekit.rpc.pb import stage_pb2


class KvBlocks:
    """The KV pool of one stage (all its TP ranks) as transfers read and write it.
    Invariant: on a stage of several ranks every read and write runs on ``pool`` (the
    compute thread), never concurrently with a step."""

    def __init__(self, runtime: StageRuntime, pool: ThreadPoolExecutor) -> None:
        lay = runtime.layout
        self._runtime = runtime
        self._io = BlockIO(runtime.kv_cache, runtime.cfg.num_kv_heads, lay.tp_size, lay.start_layer, lay.end_layer)
        self.tp_size = lay.tp_size
        self._pool = pool

    @property
    def io(self) -> BlockIO:
        """The block I/O of the runtime's pool now (a DP-group stage rebuilds it when it rejoins)."""
        kv = self._runtime.kv_cache
        if self._io.kv is not kv:
            self._io = BlockIO(kv, self._io.num_kv_heads, self.tp_size, self._io.start_layer, self._io.end_layer)
        return self._io

    @property
    def _executor(self) -> TPExecutor:
        return self._runtime.executor

    @property
    def gathers(self) -> bool:
        """Whether a send must gather the blocks into one host tensor (a TP stage: every
        rank's share; a GPU pool) instead of sending views of the pool."""
        return self.tp_size != 1 or self.io.kv.kv.is_cuda

    def announce(self, dest_blocks: list[int], land_by_ms: int = 0) -> stage_pb2.KvBlocksChunk:
        """What a sender says before the data: where it goes, what it is, and until when the
        receiver may write it (the reservation's land-by time)."""
        io = self.io
        return stage_pb2.KvBlocksChunk(blocks=dest_blocks, start_layer=io.start_layer, end_layer=io.end_layer,
                                       tp_size=self.tp_size, dtype=stage_proto.dtype_to_proto(io.kv.dtype),
                                       shape=list(io.shape(len(dest_blocks))), land_by_unix_ms=land_by_ms)

    def check(self, head: stage_pb2.KvBlocksChunk) -> Incoming:
        """What the sender announced, if it fits this stage's pool; else InvalidRequest."""
        return self.io.accept(list(head.blocks), stage_proto.dtype_from_proto(head.dtype), tuple(head.shape),
                              head.tp_size or 1, head.start_layer, head.end_layer)

    def read(self, blocks: list[int]) -> torch.Tensor:
        """The KV of ``blocks`` as one contiguous host tensor (``BlockIO.shape``), every rank's
        share on a TP stage (there: call on the compute thread, see ``read_async``)."""
        if self.tp_size != 1:
            return self._executor.read_kv(blocks)
        return self.io.read(blocks)

    async def read_async(self, blocks: list[int]) -> torch.Tensor:
        """``read`` off the event loop: on the compute thread for a TP stage, else on any
        thread (the blocks are pinned)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool if self.tp_size != 1 else None, self.read, blocks)

    async def write(self, blocks: list[int], data: torch.Tensor, src_tp: int | None = None,
                    land_by_ms: int = 0) -> None:
        """Write ``data`` (``BlockIO.shape`` for ``src_tp`` ranks, by default this stage's)
        into ``blocks`` on every rank; KV from a stage of another TP size is re-split for this
        one's ranks first (a copy, off the event loop). Past ``land_by_ms`` (the reservation's
        land-by time, Unix ms; 0: no bound) nothing is written: DeadlineExceeded, checked on
        the thread that writes, just before it does (the blocks may serve another request by then)."""
        loop = asyncio.get_running_loop()
        if src_tp is not None and src_tp != self.tp_size:
            data = await loop.run_in_executor(None, self.io.for_this_tp, data, src_tp)
        write = self._executor.write_kv if self.tp_size != 1 else self.io.write

        def write_in_time() -> None:
            check_land_by(land_by_ms)
            write(blocks, data)

        await loop.run_in_executor(self._pool if self.tp_size != 1 else None, write_in_time)


def check_land_by(land_by_ms: int) -> None:
    """DeadlineExceeded once ``land_by_ms`` (Unix ms; 0: no bound) has passed: the reservation
    the KV was meant for has lapsed, its blocks may be another request's."""
    if land_by_ms and time.time() * 1000 >= land_by_ms:
        late = time.time() - land_by_ms / 1000
        raise DeadlineExceeded(f"the KV arrived {late:.1f}s after its reservation's lease ended: not written")
