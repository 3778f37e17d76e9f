"""The all-to-all dispatch/combine of expert parallelism: 2 ranks holding *different*
tokens (as data-parallel attention will give them), each with half the experts, compute
what the single-rank layer computes on each rank's own tokens — over torch.distributed
gloo and over the shared-memory communicator, with a rank that has no tokens at all, and
with experts that do not divide evenly (5 over 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from stagekit.parallel.parallel_world import ParallelWorld
from stagekit.parallel.shm_group_communicator import ShmGroupCommunicator
from stagekit.parallel.torch_communicator import TorchCommunicator
from tests.helpers.moe_blocks import FAMILIES, HIDDEN, fused_like, hf_block
from tests.helpers.rendezvous import rendezvous_url

pytest.importorskip("transformers")

COMMUNICATORS = {"gloo": TorchCommunicator, "shm": ShmGroupCommunicator}
# tokens on (rank 0, rank 1) per step: uneven, one rank empty, then the other, both empty
STEPS = [(17, 6), (9, 0), (0, 5), (0, 0), (1, 1)]


def _check(ours: torch.nn.Module, single: torch.nn.Module, x: torch.Tensor, rank: int) -> None:
    with torch.no_grad():
        for n0, n1 in STEPS:
            mine = x[:n0] if rank == 0 else x[n0:n0 + n1]
            got = ours(mine)
            assert got.shape == mine.shape
            torch.testing.assert_close(got, single(mine), rtol=1e-5, atol=1e-5)
    # each rank counts what its own router routed: the same as the single rank on those tokens
    assert torch.equal(ours.expert_tokens, single.expert_tokens)


def _rank(rank: int, init_method: str, communicator: str) -> None:
    torch.set_num_threads(1)
    with ParallelWorld(rank, 2, init_method, timeout_s=60) as world:
        ep = world.new_group(range(2), COMMUNICATORS[communicator])
        assert type(ep.communicator) is COMMUNICATORS[communicator]
        x = torch.randn(23, HIDDEN, generator=torch.Generator().manual_seed(7))
        for family in FAMILIES:
            block = hf_block(family, torch.float32)
            ours = fused_like(family, block, torch.float32, ep_group=ep, dispatch="all_to_all")
            assert ours.local_experts == [[0, 1, 2, 3], [4, 5, 6, 7]][rank]
            assert ours.dispatcher is not None
            _check(ours, fused_like(family, block, torch.float32), x, rank)
        # 5 experts: rank 0 holds 3, rank 1 holds 2
        block.experts.gate_up_proj.data = block.experts.gate_up_proj.data[:5]
        block.experts.down_proj.data = block.experts.down_proj.data[:5]
        block.gate.weight.data = block.gate.weight.data[:5]
        block.gate.num_experts = block.experts.num_experts = 5
        ours = fused_like(family, block, torch.float32, ep_group=ep, dispatch="all_to_all")
        assert ours.local_experts == [[0, 1, 2], [3, 4]][rank]
        _check(ours, fused_like(family, block, torch.float32), x, rank)
        ep.barrier()


@pytest.mark.parametrize("communicator", list(COMMUNICATORS))
def test_all_to_all_with_different_tokens_equals_single_rank(communicator: str, tmp_path: Path) -> None:
    mp.spawn(_rank, args=(rendezvous_url(tmp_path), communicator), nprocs=2, join=True)
