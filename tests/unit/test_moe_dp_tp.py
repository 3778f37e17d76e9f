"""MoE under data-parallel attention with TP-sharded replicas: 4 ranks, two replicas of TP2
(tp groups {0, 1} and {2, 3}) and one EP group of all four, experts placed whole over it.
The ranks of a replica hold the same tokens, each dispatches its chunk by all-to-all, and
the replica's TP group gathers the chunks: every rank's output equals the single-rank layer
on its replica's tokens — with a replica that has no tokens, fewer tokens than TP ranks,
and uneven chunks; over torch.distributed gloo and over the shared-memory communicator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from stagekit.layers.moe import FusedMoE, join_chunks, token_chunk
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.parallel_world import ParallelWorld
from stagekit.parallel.shm_group_communicator import ShmGroupCommunicator
from stagekit.parallel.torch_communicator import TorchCommunicator
from tests.helpers.moe_blocks import FAMILIES, HIDDEN, INTER, SHARED, fused_like, hf_block
from tests.helpers.rendezvous import rendezvous_url

pytest.importorskip("transformers")

COMMUNICATORS = {"gloo": TorchCommunicator, "shm": ShmGroupCommunicator}
# tokens of (replica A, replica B) per step: uneven chunks, A empty, fewer tokens than TP
# ranks on both, B empty, both empty, even chunks
STEPS = [(17, 6), (0, 5), (1, 1), (7, 0), (0, 0), (4, 3)]


def _rank(rank: int, init_method: str, communicator: str) -> None:
    torch.set_num_threads(1)
    comm = COMMUNICATORS[communicator]
    replica = rank // 2
    with ParallelWorld(rank, 4, init_method, timeout_s=60) as world:
        # made in the same order on every rank; each rank gets its replica's TP group
        tps = [world.new_group([0, 1], comm), world.new_group([2, 3], comm)]
        ep = world.new_group(range(4), comm)
        tp = tps[replica]
        assert tp is not None and tps[1 - replica] is None and ep is not None
        x = torch.randn(sum(map(sum, STEPS)), HIDDEN, generator=torch.Generator().manual_seed(11))
        for family in FAMILIES:
            block = hf_block(family, torch.float32)
            ours = fused_like(family, block, torch.float32, tp_group=tp, ep_group=ep, dispatch="all_to_all")
            single = fused_like(family, block, torch.float32)
            assert ours.local_experts == [[0, 1], [2, 3], [4, 5], [6, 7]][rank]
            # experts and the shared expert are whole on the rank, not also split over its TP group
            assert ours.experts.w13_weight.shape == (2, 2 * INTER, HIDDEN)
            assert ours.experts.w2_weight.shape == (2, HIDDEN, INTER)
            if ours.shared_expert is not None:
                assert ours.shared_expert.gate_up_proj.weight.shape == (2 * SHARED, HIDDEN)
            at = 0
            with torch.no_grad():
                for sizes in STEPS:
                    mine = x[at + sum(sizes[:replica]):at + sum(sizes[:replica + 1])]  # the replica's tokens
                    at += sum(sizes)
                    got = ours(mine)
                    assert got.shape == mine.shape
                    torch.testing.assert_close(got, single(mine), rtol=1e-5, atol=1e-5)
            # every rank routes (and counts) all its replica's tokens, though it dispatches a chunk
            assert torch.equal(ours.expert_tokens, single.expert_tokens)
        ep.barrier()


@pytest.mark.parametrize("communicator", list(COMMUNICATORS))
def test_tp_replicas_over_one_ep_group_equal_single_rank(communicator: str, tmp_path: Path) -> None:
    mp.spawn(_rank, args=(rendezvous_url(tmp_path), communicator), nprocs=4, join=True)


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_chunks_cover_the_rows_and_join_back_in_order(tp: int) -> None:
    """The split and the trim of the padded all-gather, also where a short chunk sits between
    long ones' padding (3 and 4 ranks) and where chunks are empty."""
    for num_tokens in range(11):
        rows = torch.arange(num_tokens, dtype=torch.float32)[:, None].expand(num_tokens, 2)  # [T, 2]
        chunks = [rows[slice(*token_chunk(num_tokens, tp, j))] for j in range(tp)]
        want = rows.tensor_split(tp)
        assert [c.tolist() for c in chunks] == [w.tolist() for w in want]
        largest = chunks[0].shape[0]
        if largest == 0:
            continue
        padded = torch.stack([torch.cat([c, torch.full((largest - c.shape[0], 2), -1.0)]) for c in chunks])
        assert torch.equal(join_chunks(padded, num_tokens), rows)


def test_local_dispatch_with_tp_and_ep_groups_is_refused() -> None:
    # groups as a rank of the 4-rank layout sees them; building the layer needs no collective
    tp, ep = GroupCoordinator([0, 1], 0), GroupCoordinator([0, 1, 2, 3], 0)
    with pytest.raises(ValueError, match="tp group of 2 ranks and an ep group of 4 needs dispatch='all_to_all'"):
        FusedMoE(HIDDEN, 8, 2, INTER, renormalize=True, weights_fp32=True, tp_group=tp, ep_group=ep)
