"""The fused decode layer (stagekit/kernels/fused_layer.c through stagekit/models/fused_decode.py)
equals the unfused layers on the same inputs: the hidden states and residual a stage returns and
the KV it writes agree within 2e-5 (fp32: the GEMMs are the same panel kernel; RMSNorm's and
SiLU's reductions and exp round differently), over several decode steps of sequences with
different context lengths crossing block boundaries, with GQA, MHA and one KV head, q/k/v and o
biases, fp32/fp16/bf16 panels; 1 and 2 threads give bitwise-equal results; the two-call (TP)
form equals the one-call form; without a compiler the model keeps its usual path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stagekit.config.model_config import ModelConfig
from stagekit.kernels import fused_layer as fl
from stagekit.kv.forward_batch import ForwardBatch
from stagekit.kv.kv_cache import PagedKVCache
from stagekit.layers.cpu_packed import CpuWeightPlan, pack_model_weights
from stagekit.models import fused_decode
from stagekit.models.stage_model import StageModel
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.layout import StageLayout
from stagekit.parallel.parallel_groups import ParallelGroups
from stagekit.types.step import IntermediateTensors, SeqSlice

pytestmark = pytest.mark.skipif(not fl.native_available(), reason="no C compiler: the kernel is not built")

SOLO = ParallelGroups(tp=GroupCoordinator([0], 0))
BLOCK = 8
PROMPTS = (7, 8, 15, 3)  # decode positions 7..9 and 15..17 cross block boundaries (blocks of 8)
ROOT = Path(__file__).resolve().parents[2]


def _model(hq: int, hk: int, bias: bool, wdt: torch.dtype | None, start: int = 0, end: int = 2,
           qk_norm: bool = False, kernel: str = "panel") -> StageModel:
    cfg = ModelConfig(path="", name="t", architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=80,
                      num_layers=3, num_heads=hq, num_kv_heads=hk, head_dim=16, vocab_size=50,
                      max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                      tie_word_embeddings=False, qkv_bias=bias, o_bias=bias, checkpoint_dtype="float32",
                      qk_norm=qk_norm)
    model = StageModel(cfg, StageLayout(start, end, 3, 1), SOLO, torch.float32)
    g = torch.Generator().manual_seed(hq * 10 + hk)
    for name, p in model.named_parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name else 0.0))
    pack_model_weights(model, CpuWeightPlan(kernel, wdt))
    return model


def _kv_cache(hk: int) -> PagedKVCache:
    """A pool of zeros: the blocks no step writes must compare equal (torch.empty may hold NaNs)."""
    kv = PagedKVCache(2, hk, 16, torch.float32, torch.device("cpu"), 16, BLOCK)
    kv.kv.zero_()
    return kv


def _prefill(model: StageModel, kv: PagedKVCache) -> list[SeqSlice]:
    """Prefill every prompt (unfused: prefill steps never take the fused path); blocks scattered."""
    blocks = list(range(kv.num_blocks))[::-1]
    seqs = []
    for i, n in enumerate(PROMPTS):
        need = -(-(n + 4) // BLOCK)
        seqs.append(SeqSlice(i, 0, n, new_blocks=tuple(blocks[:need])))
        blocks = blocks[need:]
    kv.apply(seqs, [], [])
    ids = torch.randint(0, 50, (sum(PROMPTS),), generator=torch.Generator().manual_seed(1))
    model(ForwardBatch.build(seqs, kv, torch.device("cpu")), input_ids=ids)
    return [SeqSlice(i, n, 1) for i, n in enumerate(PROMPTS)]


def _decode(model: StageModel, kv: PagedKVCache, seqs: list[SeqSlice], fused: bool, step: int):
    os.environ[fused_decode.ENV] = "1" if fused else "0"
    try:
        ids = torch.arange(len(seqs)) * 7 % 50 + step
        return model(ForwardBatch.build(seqs, kv, torch.device("cpu")), input_ids=ids)
    finally:
        os.environ.pop(fused_decode.ENV)


@pytest.mark.parametrize(("hq", "hk", "bias", "wdt"), [(4, 2, False, None), (4, 1, True, torch.float16),
                                                      (4, 4, True, torch.bfloat16)])
def test_fused_equals_unfused_over_decode_steps(hq: int, hk: int, bias: bool, wdt: torch.dtype | None) -> None:
    model = _model(hq, hk, bias, wdt)
    kv = _kv_cache(hk)
    seqs = _prefill(model, kv)
    for step in range(3):
        before = kv.kv.clone()
        ref = _decode(model, kv, seqs, False, step)
        ref_kv, kv.kv[:] = kv.kv.clone(), before
        got = _decode(model, kv, seqs, True, step)
        assert model.model.layers["0"].__dict__["_fused_plan"].weights is not None  # the fused path ran
        for a, b in ((got.hidden_states, ref.hidden_states), (got.residual, ref.residual), (kv.kv, ref_kv)):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
        seqs = [SeqSlice(s.seq_id, s.num_computed + 1, 1) for s in seqs]


def test_one_and_two_threads_are_bitwise_equal_and_a_later_stage_fuses_too() -> None:
    model = _model(4, 2, True, None, start=1, end=3)  # a middle stage: hidden and residual come in
    kv = _kv_cache(2)
    seqs = [SeqSlice(i, 0, n, new_blocks=tuple(range(2 * i, 2 * i + 2))) for i, n in enumerate((5, 9, 1))]
    kv.apply(seqs, [], [])
    g = torch.Generator().manual_seed(3)
    model(ForwardBatch.build(seqs, kv, torch.device("cpu")),
          intermediate=IntermediateTensors(torch.randn(15, 64, generator=g), torch.randn(15, 64, generator=g)))
    seqs = [SeqSlice(i, n, 1) for i, n in enumerate((5, 9, 1))]
    states = IntermediateTensors(torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g))
    threads, outs, before = torch.get_num_threads(), [], kv.kv.clone()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            kv.kv[:] = before
            out = model(ForwardBatch.build(seqs, kv, torch.device("cpu")), intermediate=states)
            outs.append((out.hidden_states, out.residual, kv.kv.clone()))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))


def test_attention_and_mlp_halves_equal_the_whole_layer() -> None:
    """The TP form (two calls, the caller all-reduces between them) computes what one call does."""
    model = _model(4, 2, False, torch.float16)
    kv = _kv_cache(2)
    seqs = _prefill(model, kv)
    layer = model.model.layers["1"]
    _decode(model, kv, seqs, True, 0)  # builds the layer's plan
    weights = layer.__dict__["_fused_plan"].weights
    batch = ForwardBatch.build(seqs, kv, torch.device("cpu"))
    step = fl.DecodeStep(batch.positions, batch.write_blocks, batch.write_rows, batch.decode_tables,
                         batch.decode_lens, kv.kv, fl.Scratch(weights.dims))
    g = torch.Generator().manual_seed(5)
    hidden, residual = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    whole = step.run(weights, 1, hidden, residual)
    o, res = step.run(weights, 1, hidden, residual, fl.ATTENTION)
    halves = step.run(weights, 1, o, res, fl.MLP)
    assert torch.equal(whole[0], halves[0]) and torch.equal(whole[1], halves[1])
    with pytest.raises(ValueError, match="activations"):
        step.run(weights, 1, hidden[:3], residual)
    with pytest.raises(ValueError, match="KV layer"):
        step.run(weights, 2, hidden, residual)


def test_layers_and_steps_it_does_not_fit_keep_their_path() -> None:
    """Per-head q/k norms (Qwen3), oneDNN weights and prefill steps run the modules."""
    for model in (_model(4, 2, False, None, qk_norm=True), _model(4, 2, False, None, kernel="onednn")):
        kv = _kv_cache(2)
        seqs = _prefill(model, kv)
        assert not fused_decode._last.on  # a prefill step
        _decode(model, kv, seqs, True, 0)
        assert fused_decode._last.on and model.model.layers["0"].__dict__["_fused_plan"].weights is None


def test_without_a_compiler_the_model_keeps_its_path(tmp_path: Path) -> None:
    code = (
        "import torch\n"
        "from stagekit.kernels import fused_layer as fl\n"
        "from tests.unit.test_fused_layer import _model, _prefill, _decode, BLOCK\n"
        "from stagekit.kv.kv_cache import PagedKVCache\n"
        "assert not fl.native_available()\n"
        "m = _model(4, 2, True, None)\n"
        "kv = PagedKVCache(2, 2, 16, torch.float32, torch.device('cpu'), 16, BLOCK)\n"
        "out = _decode(m, kv, _prefill(m, kv), True, 0)\n"
        "from stagekit.models import fused_decode\n"
        "assert fused_decode._last is not None and not fused_decode._last.on\n"
        "assert out.hidden_states.shape == (4, 64) and torch.isfinite(out.hidden_states).all()\n"
        "print('fallback ok')\n"
    )
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), STAGEMESH_KERNEL_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "fallback ok" in out.stdout, out.stderr[-3000:]
