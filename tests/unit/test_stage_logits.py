"""Raw fp32 logits, not just log-probabilities: the last prompt position's logits of a
stage chain (every TP x PP split of the parity matrix, run in-process here: one
ModelRunner per stage over the same TP groups, hidden states and residual handed from stage
to stage) agree with transformers' within 1e-4, for the whole vocabulary. The parity
matrix (tests/integration/test_parity.py) checks tokens and log-probabilities through real
processes; log-probabilities hide a constant shift of the logits, this does not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from stagekit.engine.model_runner import ModelRunner
from stagekit.engine.stage_spec import StageSpec
from stagekit.parallel.parallel_groups import ParallelGroups
from stagekit.parallel.parallel_world import ParallelWorld
from stagekit.types.step import SeqSlice, StepHeader, StepInputs
from tests.helpers.checkpoints import MOE_ARCHS, PROMPTS
from tests.helpers.rendezvous import rendezvous_url

SPLITS = [[(0, 5)], [(0, 3), (3, 5)], [(0, 1), (1, 4), (4, 5)]]  # PP1, PP2, PP3 uneven
BLOCK = 16


def _hf_logits(path: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        return torch.stack([model(torch.tensor([p])).logits[0, -1].float() for p in PROMPTS])


def _chain_logits(path: str, splits: list[tuple[int, int]], rank: int, tp: int, init_method: str) -> torch.Tensor:
    with ParallelWorld(rank, tp, init_method) as world:
        groups = ParallelGroups(tp=world.new_group(range(tp)))
        runners = [ModelRunner(StageSpec(path, a, b, tp_size=tp, num_threads=1, show_progress=False,
                                         kv_cache_memory_bytes=4 << 20), groups) for a, b in splits]
        seqs, next_block = [], 0
        for i, p in enumerate(PROMPTS):  # all prompts in one step, as a replica head batches them
            n = -(-len(p) // BLOCK)
            seqs.append(SeqSlice(i, 0, len(p), sample=True, new_blocks=tuple(range(next_block, next_block + n))))
            next_block += n
        header, ids = StepHeader(0, seqs), [t for p in PROMPTS for t in p]
        out = None
        for k, runner in enumerate(runners):
            out = runner.run(StepInputs(header, input_ids=ids) if k == 0 else StepInputs(header, intermediate=out))
        return out


def _rank(rank: int, path: str, splits: list, tp: int, init_method: str, ref: torch.Tensor) -> None:
    logits = _chain_logits(path, splits, rank, tp, init_method)
    diff = (logits - ref).abs().max().item()
    assert diff < 1e-4, f"rank {rank} splits {splits}: max |logit diff| {diff}"


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "qwen2", *MOE_ARCHS])
def test_last_position_logits_match_transformers(arch: str, tp: int, request: pytest.FixtureRequest,
                                                 tmp_path: Path) -> None:
    checkpoints = request.getfixturevalue("moe_checkpoints" if arch in MOE_ARCHS else "hf_checkpoints")
    path = checkpoints[arch].path
    ref = _hf_logits(path)
    assert ref.shape == (len(PROMPTS), checkpoints[arch].vocab_size)
    for splits in SPLITS:
        if tp == 1:
            logits = _chain_logits(path, splits, 0, 1, "")
            assert logits.shape == ref.shape and logits.dtype == torch.float32
            diff = (logits - ref).abs().max().item()
            assert diff < 1e-4, f"splits {splits}: max |logit diff| {diff}"
        else:
            mp.spawn(_rank, args=(path, splits, tp, rendezvous_url(tmp_path), ref), nprocs=tp, join=True)
