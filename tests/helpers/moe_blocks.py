"""Sparse MoE blocks of transformers with random weights, and our FusedMoE loaded with the
same weights through its parameters' own loaders (the tests of the MoE layer share them)."""

from __future__ import annotations

import torch

from stagekit.layers.moe import FusedMoE
from stagekit.layers.weight_source import TensorSource
from stagekit.parallel.group import GroupCoordinator

HIDDEN, INTER, SHARED, E, K = 32, 24, 40, 8, 2
SOLO = GroupCoordinator(ranks=[0], rank_in_group=0)


def hf_block(family: str, dtype: torch.dtype) -> torch.nn.Module:
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


def fused_like(family: str, block: torch.nn.Module, dtype: torch.dtype, tp_group: GroupCoordinator = SOLO,
              ep_group: GroupCoordinator | None = None, dispatch: str = "local") -> FusedMoE:
    """Our layer with the block's weights, loaded through the parameters' own loaders from
    per-expert tensors (the on-disk layout)."""
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    num_experts = block.experts.gate_up_proj.shape[0]
    moe = FusedMoE(HIDDEN, num_experts, K, INTER, renormalize=family != "qwen2_moe",
                   weights_fp32=family == "mixtral", tp_group=tp_group, ep_group=ep_group,
                   shared_expert_intermediate_size=SHARED if family == "qwen2_moe" else 0,
                   checkpoint_names=names, dtype=dtype, dispatch=dispatch)
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
