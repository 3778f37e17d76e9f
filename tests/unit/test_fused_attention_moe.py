"""MoE decoder layers take the fused attention half on decode steps (stagekit/models/fused_decode.py):
a tiny random Mixtral (every layer sparse) and Qwen2-MoE (shared expert, layer 2 a dense MLP)
decode greedily with the fused path on and off, from the same prefill; each step's logits
agree within 1e-5 and the greedy tokens are equal (and equal transformers'). Counting the
kernel's calls shows what ran: the attention half alone for each MoE layer, the whole layer
for Qwen2-MoE's dense one, and nothing with ``STAGEMESH_FUSED_LAYER=0``."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from stagekit.engine.model_runner import ModelRunner
from stagekit.engine.stage_spec import StageSpec
from stagekit.kernels import fused_layer as fl
from stagekit.layers.moe import FusedMoE
from stagekit.models import fused_decode
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.parallel_groups import ParallelGroups
from stagekit.types.step import SeqSlice, StepHeader, StepInputs
from tests.helpers.checkpoints import PROMPTS, Reference, build_checkpoint

pytestmark = pytest.mark.skipif(not fl.native_available(), reason="no C compiler: the kernel is not built")
pytest.importorskip("transformers")

BLOCK, STEPS, LAYERS = 16, 4, 5
# (kernel calls per decode step: attention half alone, whole layer)
EXPECTED = {"mixtral": (5, 0), "qwen2_moe": (4, 1)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Reference]:
    root = tmp_path_factory.mktemp("moe-fused")
    return {arch: build_checkpoint(arch, root) for arch in EXPECTED}


class _Greedy:
    """One runner (its own KV cache) decoding every prompt greedily, the fused path on or off."""

    def __init__(self, path: str, fused: bool) -> None:
        spec = StageSpec(path, 0, LAYERS, num_threads=1, show_progress=False, kv_cache_memory_bytes=4 << 20,
                         linear_kernel="panel", block_size=BLOCK)
        self.runner = ModelRunner(spec, ParallelGroups(tp=GroupCoordinator([0], 0)))
        self.fused, self.step_id = fused, 0

    def step(self, seqs: list[SeqSlice], ids: list[int], monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
        monkeypatch.setenv(fused_decode.ENV, "1" if self.fused else "0")
        self.step_id += 1
        return self.runner.run(StepInputs(StepHeader(self.step_id, seqs), input_ids=ids))


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_moe_decode_with_fused_attention_equals_unfused(arch: str, checkpoints: dict[str, Reference],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    ref = checkpoints[arch]
    calls: Counter[int] = Counter()
    run = fl.DecodeStep.run

    def counting(self: fl.DecodeStep, weights: fl.FusedLayerWeights, layer: int, hidden: torch.Tensor,
                 residual: torch.Tensor | None, phases: int = fl.BOTH) -> tuple[torch.Tensor, torch.Tensor]:
        calls[phases] += 1
        return run(self, weights, layer, hidden, residual, phases)

    monkeypatch.setattr(fl.DecodeStep, "run", counting)
    fused, plain = _Greedy(ref.path, True), _Greedy(ref.path, False)
    seqs, next_block = [], 0
    for i, p in enumerate(PROMPTS):
        n = -(-(len(p) + STEPS) // BLOCK)
        seqs.append(SeqSlice(i, 0, len(p), new_blocks=tuple(range(next_block, next_block + n))))
        next_block += n
    ids = [t for p in PROMPTS for t in p]
    tokens: list[list[int]] = [[] for _ in PROMPTS]
    for k in range(STEPS + 1):
        calls.clear()
        got, want = fused.step(seqs, ids, monkeypatch), plain.step(seqs, ids, monkeypatch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        ids = got.argmax(-1).tolist()
        assert ids == want.argmax(-1).tolist()
        for out, t in zip(tokens, ids, strict=True):
            out.append(t)
        # the prefill never fuses; each decode step runs the expected kernel calls on the fused runner only
        attention, whole = EXPECTED[arch] if k else (0, 0)
        assert (calls[fl.ATTENTION], calls[fl.BOTH], calls[fl.MLP]) == (attention, whole, 0)
        seqs = [SeqSlice(s.seq_id, s.num_computed + s.num_new, 1) for s in seqs]
    assert tokens == [t[:STEPS + 1] for t in ref.tokens]
    for idx, layer in fused.runner.model.model.layers.items():  # the MoE layers' plans keep their MoE block
        plan, mlp = layer.__dict__["_fused_plan"], getattr(layer, layer.mlp_name)
        assert plan.weights.has_mlp == (plan.mlp is None) == (not isinstance(mlp, FusedMoE)), idx
        assert plan.mlp in (None, mlp)
