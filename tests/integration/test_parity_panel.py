"""The panel GEMM in the parity oracle: stages forced onto ``--linear-kernel panel`` (every
token count, prefill included) generate exactly transformers' greedy tokens with log-probs
within 1e-4 (TP1 and TP2); and with half-precision weight storage, against transformers run
in fp32 on the same half-rounded weights, to the same tolerance (both sides compute in fp32
on identical weights): ``--weight-dtype float16`` on an fp32 checkpoint (the rounding is the
stage's own), ``--weight-dtype bfloat16`` on a bf16 checkpoint (exact)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stagemesh.launcher import MeshSpec
from tests.helpers.checkpoints import NUM_NEW, PROMPTS, Reference
from tests.helpers.parity import assert_matches_reference, serve_prompts


def _reference(path: str, round_linear: torch.dtype | None = None, load_path: str | None = None) -> Reference:
    """transformers in fp32 on the checkpoint at ``load_path`` (default ``path``), its nn.Linear
    weights rounded through ``round_linear`` first when given; served from ``path``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(load_path or path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        if round_linear is not None:
            for m in model.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight.copy_(m.weight.to(round_linear).float())
        tokens, first = [], []
        for p in PROMPTS:
            ids = torch.tensor([p])
            out = model.generate(ids, max_new_tokens=NUM_NEW, do_sample=False, pad_token_id=0)
            tokens.append(out[0, len(p):].tolist())
            first.append(torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1))
    return Reference(path, model.config.vocab_size, tokens, first)


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_panel_kernel_matches_transformers(tp: int, hf_checkpoints: dict, tmp_path: Path) -> None:
    ref = hf_checkpoints["llama"]
    run = serve_prompts(MeshSpec(model=ref.path, layer_splits=[(0, 5)], tp=tp, threads=1, gateway=False,
                                 extra_stage_args=["--linear-kernel", "panel"]), ref, tmp_path)
    assert_matches_reference(run, ref)


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_fp16_weights_match_transformers_on_rounded_weights(tp: int, hf_checkpoints: dict, tmp_path: Path) -> None:
    path = hf_checkpoints["llama"].path  # fp32, untied head: only the projections are rounded
    ref = _reference(path, round_linear=torch.float16)
    run = serve_prompts(MeshSpec(model=path, layer_splits=[(0, 5)], tp=tp, threads=1, gateway=False,
                                 extra_stage_args=["--weight-dtype", "float16"]), ref, tmp_path)
    assert_matches_reference(run, ref)
    assert run.infos[0].weight_dtype == "float16"
    log = (tmp_path / "stage-r0-s0.log").read_text()
    assert "linear weights stored as float16" in log and "0 values beyond its range" in log, log[-2000:]


@pytest.mark.slow
def test_bf16_checkpoint_served_with_bf16_weights(hf_checkpoints: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    bf16 = tmp_path / "llama-bf16"
    AutoModelForCausalLM.from_pretrained(hf_checkpoints["llama"].path, dtype=torch.bfloat16).save_pretrained(bf16)
    ref = _reference(str(bf16))  # upcast to fp32: exact
    run = serve_prompts(MeshSpec(model=str(bf16), layer_splits=[(0, 3), (3, 5)], tp=1, threads=1, gateway=False,
                                 extra_stage_args=["--weight-dtype", "bfloat16"]), ref, tmp_path / "logs")
    assert_matches_reference(run, ref)
    assert {(info.dtype, info.weight_dtype) for info in run.infos} == {("float32", "bfloat16")}
