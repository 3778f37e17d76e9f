"""GPU-only checks (skipped without CUDA): the sharded layers over NCCL, one GPU per rank.
Run by scripts/gpu-check.sh on a lent GPU machine; CI has no GPU."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from stagekit.ports import free_port
from tests.unit.test_parallel_layers import TP, _checks

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < TP,
                    reason=f"needs {TP} CUDA devices (NCCL wants one GPU per rank)")
def test_sharded_layers_equal_dense_over_nccl() -> None:
    mp.spawn(_checks, args=(f"tcp://127.0.0.1:{free_port()}",), nprocs=TP, join=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layers_on_one_shared_gpu() -> None:
    """Two ranks on one GPU: the device group falls back to gloo over CUDA tensors."""
    mp.spawn(_checks, args=(f"tcp://127.0.0.1:{free_port()}",), nprocs=TP, join=True)
