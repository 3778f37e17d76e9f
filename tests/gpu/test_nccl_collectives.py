"""GPU-only (skipped without 2 CUDA devices): a group made with ``--collectives auto`` on GPUs
gets torch.distributed over NCCL, and its all_reduce / all_gather / broadcast / all_to_all
(the expert-parallel dispatch) give the exact values. Run by scripts/gpu-check.sh."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from stagekit.parallel.communicator_choice import communicator_for
from stagekit.parallel.parallel_world import ParallelWorld
from stagekit.parallel.torch_communicator import TorchCommunicator
from stagekit.ports import free_port

pytestmark = pytest.mark.gpu
WORLD = 2


def _rank(rank: int, init_method: str) -> None:
    with ParallelWorld(rank, WORLD, init_method) as world:
        comm = communicator_for("auto", world.device)
        assert comm is TorchCommunicator and world.device.type == "cuda"
        group = world.new_group(range(WORLD), comm)
        assert group is not None
        dev = world.device
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.full((3, 4096), float(rank + 1), dtype=dtype, device=dev)
            assert torch.equal(group.all_reduce(x), torch.full_like(x, 3.0))
        g = group.all_gather(torch.full((2, 3), float(rank), device=dev), dim=0)
        assert g.tolist() == [[0.0] * 3] * 2 + [[1.0] * 3] * 2
        b = group.broadcast(torch.full((5,), float(rank), device=dev), src=1)
        assert b.tolist() == [1.0] * 5
        counts = [1, 2] if rank == 0 else [0, 3]   # rank 1 sends nothing to rank 0
        rows = torch.arange(sum(counts) * 2, dtype=torch.float32, device=dev).view(-1, 2) + 100 * rank
        got, recv = group.all_to_all(rows, counts)
        if rank == 0:
            assert recv == [1, 0] and got.tolist() == [[0.0, 1.0]]
        else:
            assert recv == [2, 3] and got.tolist() == [[2.0, 3.0], [4.0, 5.0], [100.0, 101.0], [102.0, 103.0],
                                                       [104.0, 105.0]]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < WORLD,
                    reason=f"needs {WORLD} CUDA devices (NCCL wants one GPU per rank)")
def test_nccl_group_collectives() -> None:
    mp.spawn(_rank, args=(f"tcp://127.0.0.1:{free_port()}",), nprocs=WORLD, join=True)
