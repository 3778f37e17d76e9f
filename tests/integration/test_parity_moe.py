"""The MoE oracle: Mixtral, Qwen2-MoE (shared expert, norm_topk_prob false, layer 2 dense),
Qwen3-MoE and dense Qwen3 checkpoints, served by real stage processes on loopback gRPC,
generate exactly transformers' greedy tokens (eager experts), and their last-prompt-position
log-probabilities (the full vocabulary) agree within 1e-4. Layouts: one stage; TP2 with the
experts split over both ranks (``tp`` mode); PP2 (layers 0-2 | 3-4, so for Qwen2-MoE the
first stage holds the dense layer); TP2 with the experts placed whole (``--moe-parallel
ep``: 4 + 4 experts, Qwen2-MoE 3 + 3 with the shared expert on both ranks), alone, over PP2,
and with the tokens dispatched by all-to-all instead of selected locally. The dense Qwen3
has no experts to place."""

from __future__ import annotations

import pytest
import torch

from stagemesh.launcher import Mesh, MeshSpec, split_layers
from tests.helpers.checkpoints import MOE_ARCHS, NUM_NEW, PROMPTS
from tests.helpers.stage_client import generate_many, stage_info, tokens_of, wire

EP = ["--moe-parallel", "ep"]
LAYOUTS = {
    "tp1-pp1": (1, split_layers(5, 1), []),
    "tp2-pp1": (2, split_layers(5, 1), []),
    "tp1-pp2": (1, split_layers(5, 2), []),
    "tp2-pp1-ep": (2, split_layers(5, 1), EP),
    "tp2-pp2-ep": (2, split_layers(5, 2), EP),
    "tp2-pp1-ep-a2a": (2, split_layers(5, 1), [*EP, "--moe-dispatch", "all_to_all"]),
}
# one run of each ep kind stays in the default selection; the rest are marked slow
DEFAULT = {("tp1-pp1", a) for a in MOE_ARCHS} | {("tp2-pp1-ep", "qwen2_moe"), ("tp2-pp2-ep", "mixtral"),
                                                 ("tp2-pp1-ep-a2a", "qwen3_moe")}
RUNS = [pytest.param(arch, layout, marks=[] if (layout, arch) in DEFAULT else [pytest.mark.slow])
        for layout, (_, _, args) in LAYOUTS.items() for arch in MOE_ARCHS if not (EP[1] in args and arch == "qwen3")]


@pytest.mark.parametrize(("arch", "layout"), RUNS)
def test_moe_layout_matches_transformers(arch: str, layout: str, moe_checkpoints: dict, tmp_path) -> None:
    ref = moe_checkpoints[arch]
    tp, splits, args = LAYOUTS[layout]
    assert split_layers(5, 2)[0] == (0, 3)  # the PP2 split the docstring promises
    mesh = Mesh(MeshSpec(model=ref.path, layer_splits=splits, tp=tp, threads=1, gateway=False,
                         extra_stage_args=args), tmp_path)
    try:
        mesh.start(timeout_s=240)
        pipeline = mesh.replicas[0]
        wire(pipeline)
        results = generate_many(pipeline[0], PROMPTS, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True,
                                top_logprobs=ref.vocab_size)
        infos = [stage_info(address) for address in pipeline]
    finally:
        mesh.stop()
    # every token of a stage reached k experts of each of its MoE layers, counted once (on rank 0)
    loads = [sum(e.tokens) for info in infos for e in info.expert_load]
    assert len(loads) == (0 if arch == "qwen3" else 4 if arch == "qwen2_moe" else 5)
    assert len(set(loads)) <= 1 and all(n > 0 and n % 2 == 0 for n in loads)
    assert {info.moe_parallel for info in infos} == {"" if arch == "qwen3" else "ep" if EP[1] in args else "tp"}
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
