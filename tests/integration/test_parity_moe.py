"""The MoE oracle: Mixtral, Qwen2-MoE (shared expert, norm_topk_prob false, layer 2 dense),
Qwen3-MoE and dense Qwen3 checkpoints, served by real stage processes on loopback gRPC,
generate exactly transformers' greedy tokens (eager experts), and their last-prompt-position
log-probabilities (the full vocabulary) agree within 1e-4, also when the long prompt is sent
again and its first blocks come from the prefix cache. Layouts: one stage; TP2 with the
experts split over both ranks (``tp`` mode); PP2 (layers 0-2 | 3-4, so for Qwen2-MoE the
first stage holds the dense layer and sparse ones); PP2 with prompts prefilled in chunks of
at most 8 tokens mixed with decodes (2 micro-batches in flight); TP2 with the experts placed
whole (``--moe-parallel ep``: 4 + 4 experts, Qwen2-MoE 3 + 3 with the shared expert on both
ranks), alone, over PP2, and with the tokens dispatched by all-to-all instead of selected
locally. The PP2 layouts also run on the UCX data plane. The dense Qwen3 has no experts to
place."""

from __future__ import annotations

import pytest

from stagemesh.launcher import MeshSpec, split_layers
from tests.helpers.checkpoints import MOE_ARCHS
from tests.helpers.parity import assert_matches_reference, serve_prompts
from tests.transport.conftest import needs_ucx

EP = ["--moe-parallel", "ep"]
LAYOUTS = {
    "tp1-pp1": (1, split_layers(5, 1), []),
    "tp2-pp1": (2, split_layers(5, 1), []),
    "tp1-pp2": (1, split_layers(5, 2), []),
    "tp1-pp2-chunked": (1, split_layers(5, 2), ["--max-num-batched-tokens", "8"]),
    "tp2-pp1-ep": (2, split_layers(5, 1), EP),
    "tp2-pp2-ep": (2, split_layers(5, 2), EP),
    "tp2-pp1-ep-a2a": (2, split_layers(5, 1), [*EP, "--moe-dispatch", "all_to_all"]),
}
UCX_LAYOUTS = ("tp1-pp2", "tp2-pp2-ep")  # the multi-stage layouts: one with TP1 stages, one with EP stages
# one run of each kind stays in the default selection; the rest are marked slow
DEFAULT = {("tp1-pp1", a, "grpc") for a in MOE_ARCHS} | {
    ("tp2-pp1-ep", "qwen2_moe", "grpc"), ("tp2-pp2-ep", "mixtral", "grpc"), ("tp2-pp1-ep-a2a", "qwen3_moe", "grpc"),
    ("tp1-pp2-chunked", "qwen2_moe", "grpc"), ("tp2-pp2-ep", "qwen2_moe", "ucx")}
RUNS = [pytest.param(arch, layout, transport,
                     marks=([] if (layout, arch, transport) in DEFAULT else [pytest.mark.slow])
                     + ([needs_ucx] if transport == "ucx" else []))
        for transport in ("grpc", "ucx") for layout, (_, _, args) in LAYOUTS.items() for arch in MOE_ARCHS
        if (transport == "grpc" or layout in UCX_LAYOUTS) and not (EP[1] in args and arch == "qwen3")]


@pytest.mark.parametrize(("arch", "layout", "transport"), RUNS)
def test_moe_layout_matches_transformers(arch: str, layout: str, transport: str, moe_checkpoints: dict,
                                         tmp_path) -> None:
    ref = moe_checkpoints[arch]
    tp, splits, args = LAYOUTS[layout]
    assert split_layers(5, 2)[0] == (0, 3)  # the PP2 split the docstring promises
    run = serve_prompts(MeshSpec(model=ref.path, layer_splits=splits, tp=tp, threads=1, gateway=False,
                                 extra_stage_args=args, transport=transport), ref, tmp_path)
    assert {info.transport for info in run.infos} == {transport}
    # every token of a stage reached k experts of each of its MoE layers, counted once (on rank 0)
    loads = [sum(e.tokens) for info in run.infos for e in info.expert_load]
    assert len(loads) == (0 if arch == "qwen3" else 4 if arch == "qwen2_moe" else 5)
    assert len(set(loads)) <= 1 and all(n > 0 and n % 2 == 0 for n in loads)
    assert {info.moe_parallel for info in run.infos} == {"" if arch == "qwen3" else "ep" if EP[1] in args else "tp"}
    assert_matches_reference(run, ref)
