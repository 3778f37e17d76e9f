"""The routed experts in one native call (kernels/moe_experts.c) equal ExpertWeights' Python
path on the same packed weights: forward (weighted, each token's k choices added) and
``grouped`` (unweighted pairs, as the all-to-all dispatcher calls it), with experts that get
no tokens and experts held elsewhere (EP), for fp32 and fp16 panels; and 1 and 2 threads
give bitwise-equal results."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from stagekit.kernels import fused_layer
from stagekit.kernels import moe_experts as native
from stagekit.layers.cpu_packed import CpuWeightPlan
from stagekit.layers.moe_experts import ExpertWeights
from stagekit.parallel.group import GroupCoordinator

if not native.native_available():
    pytest.skip("no C compiler: the native MoE experts kernel is not built here", allow_module_level=True)

run = native.run
HIDDEN, INTER, E = 40, 24, 5  # 40: the down projection's last panel is padded
ALL, SUBSET = list(range(E)), [0, 2, 3]  # expert 0 never gets a token (routing below)
NAMES = ("w1", "w3", "w2")


def experts(local: list[int], weight_dtype: torch.dtype | None) -> ExpertWeights:
    """Experts ``local`` of E with random weights, panel-packed in ``weight_dtype``."""
    mod = ExpertWeights(E, HIDDEN, INTER, GroupCoordinator(ranks=[0], rank_in_group=0), local, NAMES)
    g = torch.Generator().manual_seed(7)
    full13, full2 = torch.randn(E, 2 * INTER, HIDDEN, generator=g), torch.randn(E, HIDDEN, INTER, generator=g)
    with torch.no_grad():  # slot i holds expert local[i]: the same expert, the same weights, whatever the subset
        mod.w13_weight.copy_(full13[local] * 0.3)
        mod.w2_weight.copy_(full2[local] * 0.3)
    assert mod.pack_weights(CpuWeightPlan("panel", weight_dtype)) is not None
    return mod


def routing(num_tokens: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, HIDDEN, generator=g)
    scores = torch.rand(num_tokens, E, generator=g)
    scores[:, 0] = -1.0  # expert 0 gets no tokens
    weights, ids = scores.topk(k, dim=-1)
    return x, weights.contiguous(), ids


def python_path(monkeypatch: pytest.MonkeyPatch, fn: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setenv(fused_layer.ENV, "0")
        m.setattr(native, "run", lambda *a, **kw: pytest.fail("the native call ran with STAGEMESH_FUSED_LAYER=0"))
        return fn(*args)


@pytest.mark.parametrize("weight_dtype", [None, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("local", [ALL, SUBSET], ids=["all", "ep-subset"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("num_tokens", [1, 2, 7, 33, 200])
def test_forward_equals_python_path(monkeypatch: pytest.MonkeyPatch, num_tokens: int, k: int, local: list[int],
                                    weight_dtype: torch.dtype | None) -> None:
    mod = experts(local, weight_dtype)
    x, weights, ids = routing(num_tokens, k, seed=num_tokens * 10 + k)
    with torch.no_grad():
        ref = python_path(monkeypatch, mod, x, weights, ids)
        with monkeypatch.context() as m:  # the native call takes the whole layer: no per-expert Python
            m.setattr(ExpertWeights, "_expert", lambda *a: pytest.fail("the Python path ran"))
            got = mod(x, weights, ids)
    assert got.shape == ref.shape == (num_tokens, HIDDEN)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # a token routed only to experts held elsewhere gets zero, as on the Python path; the others do not
    held = torch.isin(ids, torch.tensor(local)).any(dim=-1)
    assert (got[~held] == 0).all() and (got[held].abs().sum(dim=-1) > 0).all()


@pytest.mark.parametrize("local", [ALL, SUBSET], ids=["all", "ep-subset"])
def test_grouped_keeps_its_contract(monkeypatch: pytest.MonkeyPatch, local: list[int]) -> None:
    """As the all-to-all dispatcher calls it: one row per pair, unweighted, zero rows for
    experts held elsewhere."""
    mod = experts(local, None)
    x, _, ids = routing(19, 1, seed=3)
    ids = ids.flatten()
    with torch.no_grad():
        ref = python_path(monkeypatch, mod.grouped, x, ids)
        got = mod.grouped(x, ids)
        assert mod.grouped(x[:0], ids[:0]).shape == (0, HIDDEN)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    held = torch.isin(ids, torch.tensor(local))
    assert (got[~held] == 0).all() and (got[held].abs().sum(dim=-1) > 0).all()


def test_thread_count_does_not_change_bits() -> None:
    mod = experts(ALL, None)
    x, weights, ids = routing(33, 2, seed=5)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = mod(x, weights, ids)
            torch.set_num_threads(2)
            two = mod(x, weights, ids)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_calls_split_to_bound_the_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long prefill runs as several calls, each within the scratch bound: same bits (also
    ``grouped`` with weights and several pairs per row, checked against the Python path)."""
    mod = experts(SUBSET, None)
    x, weights, ids = routing(33, 2, seed=9)
    pairs = (x, ids.flatten(), weights.flatten(), 2)
    with torch.no_grad():
        whole, rows = mod(x, weights, ids), mod.grouped(*pairs)
        torch.testing.assert_close(rows, python_path(monkeypatch, mod.grouped, *pairs), rtol=1e-5, atol=1e-5)
        per_pair = 4 * (2 * HIDDEN + 3 * INTER)
        monkeypatch.setattr(native, "SCRATCH_BYTES", 5 * per_pair)  # 5 pairs a call: 2 tokens, or 5 rows
        calls = []
        monkeypatch.setattr(native, "run", lambda *a, **kw: calls.append(1) or run(*a, **kw))
        assert torch.equal(mod(x, weights, ids), whole) and len(calls) == 17
        assert torch.equal(mod.grouped(*pairs), rows)


def test_bad_routing_is_refused() -> None:
    mod = experts(ALL, None)
    x, _, _ = routing(3, 1, seed=1)
    order = torch.tensor([0, 0, 1])  # not a permutation
    with pytest.raises(ValueError, match="routing"):
        native.run(mod._panels, x, order, torch.tensor([0, 0, 1, 2, 3, 3]), None, 1, 1)


def test_profile_counts_the_packed_expert_bytes() -> None:
    from stagemesh.bench.step_profile import expert_bytes

    # panels: 16-row blocks, rows past the weight's zero-padded; fp16 halves the bytes
    w13_rows, w2_rows = -(-2 * INTER // 16) * 16, -(-HIDDEN // 16) * 16
    per_expert = w13_rows * HIDDEN + w2_rows * INTER
    for dtype, size in ((None, 4), (torch.float16, 2)):
        assert expert_bytes(experts(SUBSET, dtype)) == len(SUBSET) * per_expert * size
