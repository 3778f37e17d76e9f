"""The fused MoE layer equals transformers' sparse MoE blocks (eager experts) on random
inputs, per family's routing rules; its TP2 split (each expert's hidden units over 2 gloo
ranks, the shared expert too) and its EP2 placement (5 experts placed 3 + 2) equal the
single-rank layer."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from stagekit.layers.moe import FusedMoE
from stagekit.layers.weight_source import TensorSource
from stagekit.parallel.expert_placement import contiguous_placement, placement_map
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.parallel_world import ParallelWorld
from stagekit.ports import free_port

transformers = pytest.importorskip("transformers")

HIDDEN, INTER, SHARED, E, K = 32, 24, 40, 8, 2
SOLO = GroupCoordinator(ranks=[0], rank_in_group=0)


def _hf_block(family: str, dtype: torch.dtype) -> torch.nn.Module:
    common = dict(hidden_size=HIDDEN, num_experts_per_tok=K, experts_implementation="eager")
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock

        block = MixtralSparseMoeBlock(MixtralConfig(intermediate_size=INTER, num_local_experts=E, **common))
    elif family == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock

        block = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
            moe_intermediate_size=INTER, shared_expert_intermediate_size=SHARED, num_experts=E,
            norm_topk_prob=False, **common))
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeSparseMoeBlock

        block = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(moe_intermediate_size=INTER, num_experts=E,
                                                      norm_topk_prob=True, **common))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return block.to(dtype).eval()


def _ours(family: str, block: torch.nn.Module, dtype: torch.dtype, tp_group: GroupCoordinator = SOLO,
          ep_group: GroupCoordinator | None = None) -> FusedMoE:
    """Our layer with the block's weights, loaded through the parameters' own loaders from
    per-expert tensors (the on-disk layout)."""
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    num_experts = block.experts.gate_up_proj.shape[0]
    moe = FusedMoE(HIDDEN, num_experts, K, INTER, renormalize=family != "qwen2_moe",
                   weights_fp32=family == "mixtral", tp_group=tp_group, ep_group=ep_group,
                   shared_expert_intermediate_size=SHARED if family == "qwen2_moe" else 0,
                   checkpoint_names=names, dtype=dtype)
    params = dict(moe.named_parameters())
    moe.gate.weight.copy_(block.gate.weight)
    for name, (param, shard) in moe.experts.checkpoint_tensors("experts").items():
        expert, frag = int(name.split(".")[1]), name.split(".")[2]
        gate, up = block.experts.gate_up_proj[expert].chunk(2, dim=0)
        t = {names[0]: gate, names[1]: up, names[2]: block.experts.down_proj[expert]}[frag]
        params[param].weight_loader(params[param], TensorSource(t.detach()), shard)
    if family == "qwen2_moe":
        mlp, hf = moe.shared_expert, block.shared_expert
        mlp.gate_up_proj.weight_loader(mlp.gate_up_proj.weight, TensorSource(hf.gate_proj.weight.detach()), 0)
        mlp.gate_up_proj.weight_loader(mlp.gate_up_proj.weight, TensorSource(hf.up_proj.weight.detach()), 1)
        mlp.down_proj.weight_loader(mlp.down_proj.weight, TensorSource(hf.down_proj.weight.detach()))
        moe.shared_expert_gate.weight.copy_(block.shared_expert_gate.weight)
    return moe


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_tokens", [1, 3, 37])
def test_equals_transformers_block_fp32(family: str, num_tokens: int) -> None:
    block = _hf_block(family, torch.float32)
    ours = _ours(family, block, torch.float32)
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
    block = _hf_block(family, torch.bfloat16)
    ours = _ours(family, block, torch.bfloat16)
    x = torch.randn(16, HIDDEN, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(x), block(x[None])[0])


def test_zero_tokens_and_packed_weights() -> None:
    block = _hf_block("qwen2_moe", torch.float32)
    ours = _ours("qwen2_moe", block, torch.float32)
    x = torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert ours(x[:0]).shape == (0, HIDDEN)
        dense = ours(x)
        assert ours.experts.pack_weights()
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
        block = _hf_block(family, torch.float32)
        with torch.no_grad():
            want = _ours(family, block, torch.float32)(x)
            tp = _ours(family, block, torch.float32, tp_group=group)
            assert tp.experts.w13_weight.shape == (E, INTER, HIDDEN)  # half of each expert's 2*INTER rows
            torch.testing.assert_close(tp(x), want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tp(x[:0]), want[:0])  # a rank with no tokens still joins the sum
            # EP: 5 experts placed whole, 3 on rank 0 and 2 on rank 1; the shared expert whole on both
            block.experts.gate_up_proj.data = block.experts.gate_up_proj.data[:5]
            block.experts.down_proj.data = block.experts.down_proj.data[:5]
            block.gate.weight.data = block.gate.weight.data[:5]
            block.gate.num_experts = block.experts.num_experts = 5
            want5 = _ours(family, block, torch.float32)(x)
            ep = _ours(family, block, torch.float32, ep_group=group)
            assert ep.local_experts == [[0, 1, 2], [3, 4]][rank]
            torch.testing.assert_close(ep(x), want5, rtol=1e-5, atol=1e-5)
    group.barrier()
    world.close()


def test_tp2_and_ep2_equal_single_rank() -> None:
    mp.spawn(_sharded, args=(f"tcp://127.0.0.1:{free_port()}",), nprocs=2, join=True)
