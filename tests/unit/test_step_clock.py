"""The step clock's attribution: exclusive time per category, one record per engine step, the
engine-side gaps from the marks, categories that add up to the step, nothing left attached."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from stagemesh.bench import step_clock
from stagemesh.bench.llama_cpp_baseline import parse_rows
from stagemesh.bench.read_bandwidth import read_bandwidth
from stagemesh.bench.step_clock import StepClock


class FakeTime:
    """perf_counter that moves only when the code under test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    t = FakeTime()
    monkeypatch.setattr(step_clock.time, "perf_counter", t.perf_counter)
    return t


class Inner(nn.Module):
    def __init__(self, t: FakeTime) -> None:
        super().__init__()
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.t.spend(0.003)
        return x


class Outer(nn.Module):
    def __init__(self, t: FakeTime) -> None:
        super().__init__()
        self.t, self.inner = t, Inner(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.t.spend(0.001)
        return self.inner(x)


def fake_engine(t: FakeTime, model: Outer) -> SimpleNamespace:
    seq = SimpleNamespace(num_new=1, sample=True)
    header = SimpleNamespace(seqs=[seq], num_tokens=1)

    def schedule(depth: int) -> SimpleNamespace:
        t.spend(0.0005)
        return header

    def process(step: object) -> torch.Tensor:
        t.spend(0.0002)
        return model(torch.zeros(1))

    def postprocess(h: object, result: object) -> None:
        t.spend(0.0001)

    return SimpleNamespace(scheduler=SimpleNamespace(schedule=schedule, postprocess=postprocess),
                           runtime=SimpleNamespace(process=process))


def test_regions_count_exclusive_time_and_steps_add_up(fake_time: FakeTime) -> None:
    model = Outer(fake_time)
    eng = fake_engine(fake_time, model)
    clock = StepClock()
    clock.step_boundary(eng.scheduler)
    clock.wrap(eng.scheduler, "postprocess", "scheduler")
    clock.mark(eng.scheduler, "postprocess", "post_start", "post_end")
    clock.wrap(eng.runtime, "process", "runtime")
    clock.mark(eng.runtime, "process", "process_start", "process_end")
    clock.hook(model, "layer_glue")
    clock.hook(model.inner, "matmul")
    for _ in range(2):   # what the engine loop does per step, with the hand-offs between
        header = eng.scheduler.schedule(1)
        fake_time.spend(0.002)            # to the compute thread
        out = eng.runtime.process(header)
        fake_time.spend(0.004)            # back to the loop
        eng.scheduler.postprocess(header, out)
        fake_time.spend(0.0007)           # streaming the token
    eng.scheduler.schedule(1)             # closes the second step
    assert len(clock.records) == 2
    for rec in clock.records:
        assert rec.decode and rec.num_seqs == 1
        expected = {"scheduler": 0.0006, "to_compute": 0.002, "runtime": 0.0002, "layer_glue": 0.001,
                    "matmul": 0.003, "to_loop": 0.004, "event_loop": 0.0007}
        assert rec.seconds == pytest.approx(expected)
        assert sum(rec.seconds.values()) == pytest.approx(rec.wall)
    clock.detach()
    assert not model._forward_hooks and not model._forward_pre_hooks and not model.inner._forward_hooks
    assert "schedule" in vars(eng.scheduler) and eng.scheduler.schedule.__name__ == "schedule"
    assert eng.runtime.process.__name__ == "process"


def test_detach_restores_class_methods() -> None:
    class Sampler:
        def sample(self) -> str:
            return "real"

    s = Sampler()
    clock = StepClock()
    clock.wrap(s, "sample", "sampling")
    clock.mark(s, "sample", "a", "b")
    assert s.sample() == "real"
    clock.detach()
    assert "sample" not in vars(s) and s.sample() == "real"


def test_read_bandwidth_is_positive_and_checks_its_input() -> None:
    before = torch.get_num_threads()
    assert read_bandwidth(1, nbytes=8 << 20, repeats=3) > 0
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads 0"):
        read_bandwidth(0)


def test_llama_batched_bench_table_is_parsed() -> None:
    text = """
main: n_kv_max = 8192, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, n_threads = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |    128 |    1 |    256 |    0.180 |   711.11 |    1.600 |    80.00 |    1.780 |   143.82 |
|   128 |    128 |    8 |   2048 |    1.500 |   682.67 |    3.664 |   279.48 |    5.164 |   396.59 |
"""
    rows = parse_rows(text)
    assert set(rows) == {1, 8}
    assert rows[1] == {"prompt_len": 128, "output_len": 128, "output_tok_s": round(128 / 1.78, 2),
                       "decode_tok_s": 80.0, "decode_step_ms": 12.5, "prefill_s": 0.18}
    assert rows[8]["output_tok_s"] == round(8 * 128 / 5.164, 2)
