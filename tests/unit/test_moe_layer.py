"""The fused MoE layer equals transformers' sparse MoE blocks (eager experts) on random
inputs, per family's routing rules; its TP2 split (each expert's hidden units over 2 gloo
ranks, the shared expert too) and its EP2 placement (5 experts placed 3 + 2) equal the
single-rank layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from stagekit.layers.cpu_packed import CpuWeightPlan
from stagekit.parallel.expert_placement import contiguous_placement, placement_map
from stagekit.parallel.parallel_world import ParallelWorld
from tests.helpers.moe_blocks import FAMILIES, HIDDEN, INTER, E, fused_like, hf_block
from tests.helpers.rendezvous import rendezvous_url

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_tokens", [1, 3, 37])
def test_equals_transformers_block_fp32(family: str, num_tokens: int) -> None:
    block = hf_block(family, torch.float32)
    ours = fused_like(family, block, torch.float32)
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(num_tokens))
    with torch.no_grad():
        ref = block(x[None])[0]
        got = ours(x)
        _, ids = ours.gate(x)
    if num_tokens < 4:  # at most 3*2 of 8 experts chosen: some receive no tokens
        assert len(ids.unique()) < E
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_transformers_block_bf16(family: str) -> None:
    """In bf16 the routing weights' dtype decides the rounding: Mixtral multiplies in fp32,
    Qwen rounds the weights to bf16 first. Same ops in the same order: bit-identical."""
    block = hf_block(family, torch.bfloat16)
    ours = fused_like(family, block, torch.bfloat16)
    x = torch.randn(16, HIDDEN, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(x), block(x[None])[0])


@pytest.mark.parametrize("weight_dtype", [None, torch.float16], ids=["fp32", "fp16-weights"])
def test_zero_tokens_and_packed_weights(weight_dtype: torch.dtype | None) -> None:
    """Packed experts (panels for the few tokens each gets, or half-precision panels) equal
    the dense layer holding the same (rounded) weights."""
    block = hf_block("qwen2_moe", torch.float32)
    ours = fused_like("qwen2_moe", block, torch.float32)
    x = torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert ours(x[:0]).shape == (0, HIDDEN)
        if weight_dtype is not None:
            for w in (ours.experts.w13_weight, ours.experts.w2_weight):
                w.copy_(w.to(weight_dtype).float())
        dense = ours(x)
        assert ours.experts.pack_weights(CpuWeightPlan("auto", weight_dtype)) is not None
        torch.testing.assert_close(ours(x), dense, rtol=1e-5, atol=1e-5)


def test_contiguous_placement_gives_first_ranks_the_extra_expert() -> None:
    assert placement_map(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert placement_map(5, 2) == [[0, 1, 2], [3, 4]]
    assert placement_map(10, 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    with pytest.raises(Exception, match="larger than the model's 3 experts"):
        contiguous_placement(3, 4, 0)


def _sharded(rank: int, init_method: str) -> None:
    torch.set_num_threads(1)
    world = ParallelWorld(rank, 2, init_method)
    group = world.new_group(range(2))
    x = torch.randn(11, HIDDEN, generator=torch.Generator().manual_seed(5))
    for family in FAMILIES:
        block = hf_block(family, torch.float32)
        with torch.no_grad():
            want = fused_like(family, block, torch.float32)(x)
            tp = fused_like(family, block, torch.float32, tp_group=group)
            assert tp.experts.w13_weight.shape == (E, INTER, HIDDEN)  # half of each expert's 2*INTER rows
            torch.testing.assert_close(tp(x), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tp(x[:0]), want[:0])  # a rank with no tokens still joins the sum
            # EP: 5 experts placed whole, 3 on rank 0 and 2 on rank 1; the shared expert whole on both
            block.experts.gate_up_proj.data = block.experts.gate_up_proj.data[:5]
            block.experts.down_proj.data = block.experts.down_proj.data[:5]
            block.gate.weight.data = block.gate.weight.data[:5]
            block.gate.num_experts = block.experts.num_experts = 5
            want5 = fused_like(family, block, torch.float32)(x)
            ep = fused_like(family, block, torch.float32, ep_group=group)
            assert ep.local_experts == [[0, 1, 2], [3, 4]][rank]
            torch.testing.assert_close(ep(x), want5, rtol=1e-5, atol=1e-5)
    group.barrier()
    world.close()


def test_tp2_and_ep2_equal_single_rank(tmp_path: Path) -> None:
    mp.spawn(_sharded, args=(rendezvous_url(tmp_path),), nprocs=2, join=True)
