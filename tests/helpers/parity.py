"""Serve a reference checkpoint in one layout and compare what it generates with transformers':
the machinery the dense and MoE parity oracles share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stagekit.rpc.pb import stage_pb2
from stagemesh.launcher import Mesh, MeshSpec
from tests.helpers.checkpoints import NUM_NEW, PROMPTS, Reference
from tests.helpers.stage_client import generate_many, stage_info, tokens_of, wire

REPEATED = 2          # the long prompt (40 tokens) is sent again once the first run is done
CACHED_TOKENS = 32    # its two full blocks then come from the prefix cache


@dataclass
class ParityRun:
    """What one layout produced: the responses to PROMPTS (sent at once, so they share batches)
    followed by those to PROMPTS[REPEATED] sent again alone, every stage's GetInfo after both,
    and how many prompt tokens the head took from its prefix cache for the repeat."""

    responses: list[list[stage_pb2.GenerateResponse]]
    infos: list[stage_pb2.StageInfo]
    repeat_prefix_hits: int


def serve_prompts(spec: MeshSpec, ref: Reference, log_dir: Path) -> ParityRun:
    """Start the mesh of ``spec`` (one replica, no gateway), generate greedily with the full
    vocabulary's log-probabilities, and stop it."""
    mesh = Mesh(spec, log_dir)
    sampling = dict(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True, top_logprobs=ref.vocab_size)
    try:
        mesh.start(timeout_s=240)
        pipeline = mesh.replicas[0]
        wire(pipeline)
        responses = generate_many(pipeline[0], PROMPTS, **sampling)
        hits_before = stage_info(pipeline[0]).prefix_hit_tokens
        responses += generate_many(pipeline[0], [PROMPTS[REPEATED]], **sampling)
        infos = [stage_info(address) for address in pipeline]
    finally:
        mesh.stop()
    return ParityRun(responses, infos, infos[0].prefix_hit_tokens - hits_before)


def assert_matches_reference(run: ParityRun, ref: Reference) -> None:
    """Greedy tokens exact and last-prompt-position log-probabilities within 1e-4 of
    transformers', for every prompt and for the repeat served from the prefix cache."""
    assert run.repeat_prefix_hits == CACHED_TOKENS, "the repeated prompt was expected to hit the prefix cache"
    for i, responses in zip([*range(len(PROMPTS)), REPEATED], run.responses, strict=True):
        assert tokens_of(responses) == ref.tokens[i], f"prompt {i}"
        first = next(r for r in responses if r.token_ids)
        ours = torch.full((ref.vocab_size,), float("nan"))
        for e in first.top_logprobs[0].top:
            ours[e.token_id] = e.logprob
        assert not torch.isnan(ours).any()
        diff = (ours - ref.first_logprobs[i]).abs().max().item()
        assert diff < 1e-4, f"prompt {i}: max |logprob diff| {diff}"
        assert responses[-1].finish_reason != 0 and responses[-1].completion_tokens == NUM_NEW
