"""The MoE oracle: Mixtral, Qwen2-MoE (shared expert, norm_topk_prob false, layer 2 dense),
Qwen3-MoE and dense Qwen3 checkpoints, served by real stage processes on loopback gRPC,
generate exactly transformers' greedy tokens (eager experts), and their last-prompt-position
log-probabilities (the full vocabulary) agree within 1e-4. Layouts: one stage; TP2 with the
experts split over both ranks (``tp`` mode); PP2 (layers 0-2 | 3-4, so for Qwen2-MoE the
first stage holds the dense layer)."""

from __future__ import annotations

import pytest
import torch

from stagemesh.launcher import Mesh, MeshSpec, split_layers
from tests.helpers.checkpoints import MOE_ARCHS, NUM_NEW, PROMPTS
from tests.helpers.stage_client import generate_many, tokens_of, wire

LAYOUTS = {
    "tp1-pp1": (1, split_layers(5, 1)),
    "tp2-pp1": (2, split_layers(5, 1)),
    "tp1-pp2": (1, split_layers(5, 2)),
}
RUNS = [pytest.param(arch, layout, marks=[pytest.mark.slow] if layout != "tp1-pp1" else [])
        for layout in LAYOUTS for arch in MOE_ARCHS]


@pytest.mark.parametrize(("arch", "layout"), RUNS)
def test_moe_layout_matches_transformers(arch: str, layout: str, moe_checkpoints: dict, tmp_path) -> None:
    ref = moe_checkpoints[arch]
    tp, splits = LAYOUTS[layout]
    assert split_layers(5, 2)[0] == (0, 3)  # the PP2 split the docstring promises
    mesh = Mesh(MeshSpec(model=ref.path, layer_splits=splits, tp=tp, threads=1, gateway=False), tmp_path)
    try:
        mesh.start(timeout_s=240)
        pipeline = mesh.replicas[0]
        wire(pipeline)
        results = generate_many(pipeline[0], PROMPTS, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True,
                                top_logprobs=ref.vocab_size)
    finally:
        mesh.stop()
    for i, responses in enumerate(results):
        assert tokens_of(responses) == ref.tokens[i], f"prompt {i}"
        first = next(r for r in responses if r.token_ids)
        ours = torch.full((ref.vocab_size,), float("nan"))
        for e in first.top_logprobs[0].top:
            ours[e.token_id] = e.logprob
        assert not torch.isnan(ours).any()
        diff = (ours - ref.first_logprobs[i]).abs().max().item()
        assert diff < 1e-4, f"prompt {i}: max |logprob diff| {diff}"
        assert responses[-1].completion_tokens == NUM_NEW
