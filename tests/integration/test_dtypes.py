"""Half precision stays correct: a stage loaded with --dtype bfloat16 / float16 agrees with
transformers running the same checkpoint in the same dtype (TP2 on the half-precision
path, so the sharded math is covered too)."""

from __future__ import annotations

import pytest
import torch

from stagemesh.launcher import Mesh, MeshSpec
from tests.helpers.checkpoints import PROMPTS
from tests.helpers.stage_client import generate_many, tokens_of, wire

# bf16 keeps 8 bits of mantissa: a different (but equally valid) summation order moves
# log-probs by a few hundredths on this model.
TOLERANCE = {"bfloat16": 0.1, "float16": 0.02}


def _hf_reference(path: str, dtype: torch.dtype, vocab: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    firsts, tokens = [], []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            firsts.append(torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1))
            out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            tokens.append(out[0, len(p):].tolist())
    return firsts, tokens


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_matches_transformers(dtype: str, hf_checkpoints: dict, tmp_path) -> None:
    ref = hf_checkpoints["llama"]
    firsts, hf_tokens = _hf_reference(ref.path, getattr(torch, dtype), ref.vocab_size)
    mesh = Mesh(MeshSpec(model=ref.path, layer_splits=[(0, 5)], tp=2, threads=1, dtype=dtype, gateway=False),
                tmp_path)
    try:
        mesh.start(timeout_s=240)
        wire(mesh.replicas[0])
        results = generate_many(mesh.replicas[0][0], PROMPTS, temperature=0.0, max_tokens=4, ignore_eos=True,
                                top_logprobs=ref.vocab_size)
    finally:
        mesh.stop()
    agree = 0
    for i, responses in enumerate(results):
        first = next(r for r in responses if r.token_ids)
        ours = torch.full((ref.vocab_size,), float("nan"))
        for e in first.top_logprobs[0].top:
            ours[e.token_id] = e.logprob
        diff = (ours - firsts[i]).abs().max().item()
        assert diff < TOLERANCE[dtype], f"prompt {i}: max |logprob diff| {diff}"
        agree += tokens_of(responses)[0] == hf_tokens[i][0]
    # the first greedy token can flip only where two candidates are within the tolerance
    assert agree >= len(PROMPTS) - 1
