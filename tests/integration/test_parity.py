"""The oracle: every TP x PP layout, as real stage processes on loopback gRPC, generates
exactly transformers' greedy tokens, and its last-prompt-position log-probabilities (the
full vocabulary) agree with transformers' within 1e-4 — also when a prompt's first blocks
come from the prefix cache instead of being computed. Every layout runs on the gRPC data
plane; the multi-stage ones that shape the traffic differently run on UCX too."""

from __future__ import annotations

import pytest

from stagekit.transport.ucx.runtime import ucx_importable
from stagemesh.launcher import MeshSpec, split_layers
from tests.helpers.parity import assert_matches_reference, serve_prompts

LAYOUTS = {
    "tp1-pp1": (1, split_layers(5, 1), []),
    "tp2-pp1": (2, split_layers(5, 1), []),
    "tp2-pp1-gloo": (2, split_layers(5, 1), ["--collectives", "gloo"]),   # TP over torch.distributed gloo
    "tp1-pp2": (1, split_layers(5, 2), []),
    "tp2-pp2": (2, split_layers(5, 2), []),
    "tp1-pp3-uneven": (1, [(0, 1), (1, 4), (4, 5)], []),
    # prompts prefilled in chunks of at most 8 tokens, mixed with decodes, 2 micro-batches in flight
    "tp1-pp2-chunked": (1, split_layers(5, 2), ["--max-num-batched-tokens", "8"]),
}


# (layout, data plane) pairs: one-stage layouts have no data plane to vary
UCX_LAYOUTS = ["tp1-pp2", "tp2-pp2", "tp1-pp3-uneven"]
RUNS = [(layout, "grpc") for layout in LAYOUTS] + [
    pytest.param(layout, "ucx", marks=pytest.mark.skipif(not ucx_importable(), reason="ucxx does not import"))
    for layout in UCX_LAYOUTS
]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(("layout", "transport"), RUNS)
def test_layout_matches_transformers(arch: str, layout: str, transport: str | None, hf_checkpoints: dict,
                                     tmp_path) -> None:
    ref = hf_checkpoints[arch]
    tp, splits, stage_args = LAYOUTS[layout]
    run = serve_prompts(MeshSpec(model=ref.path, layer_splits=splits, tp=tp, threads=1, gateway=False,
                                 extra_stage_args=stage_args, transport=transport), ref, tmp_path)
    if transport is not None:
        assert {info.transport for info in run.infos} == {transport}
    if tp > 1:  # which communicator carried the TP collectives (shared memory unless told gloo)
        expect = "TorchCommunicator" if "gloo" in stage_args else "ShmGroupCommunicator"
        log = (tmp_path / "stage-r0-s0.log").read_text()
        assert f"TP collectives: {expect}" in log, log[-2000:]
    assert_matches_reference(run, ref)


@pytest.mark.slow
def test_mistral_checkpoint_matches_transformers(hf_checkpoints: dict, tmp_path) -> None:
    """MistralForCausalLM checkpoints are served by the Llama block (TP2 x PP2 here)."""
    test_layout_matches_transformers("mistral", "tp2-pp2", None, hf_checkpoints, tmp_path)
