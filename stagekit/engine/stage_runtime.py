"""What every stage does with one step, head or not: free finished sequences, register
the sampling parameters of new ones, run the layers on all TP ranks, and on the last
stage sample. Runs on the stage's compute thread (it blocks on collectives)."""

from __future__ import annotations

import time

import torch

from stagekit.engine.sampler import Sampler
from stagekit.engine.stats import StageStats
from stagekit.engine.tp_executor import TPExecutor
from stagekit.types.expert_load import ExpertLoad
from stagekit.types.step import IntermediateTensors, StepInputs, StepResult


class StageRuntime:
    """Wraps the TP executor with the step protocol; owns the sampler on the last stage."""

    def __init__(self, executor: TPExecutor) -> None:
        self.executor = executor
        self.spec = executor.spec
        runner = executor.runner
        self.cfg, self.layout, self.dtype = runner.cfg, runner.layout, runner.dtype
        self.kv_cache = runner.kv_cache
        self.sampler = Sampler(self.cfg.eos_token_ids) if self.layout.is_last else None
        self.stats = StageStats()

    def process(self, step: StepInputs) -> IntermediateTensors | StepResult | None:
        """Run one step. Returns the tensors for the next stage, or on the last stage the
        sampled tokens; None for a step with no sequences on a middle stage."""
        header = step.header
        if self.sampler is not None:
            self.sampler.remove(header.freed_seq_ids)
            for ns in header.new_seqs:
                self.sampler.add(ns.seq_id, ns.params)
        started = time.perf_counter()
        try:
            out = self.executor.execute(step)
        except Exception:
            self.stats.step_failures_total += 1
            raise
        if header.seqs:
            self.stats.observe_step(len(header.seqs), header.num_tokens, time.perf_counter() - started)
        if self.sampler is None:
            return out
        sampled = [s.seq_id for s in header.seqs if s.sample]
        if not sampled:
            return StepResult(header.step_id, [], [], [])
        assert isinstance(out, torch.Tensor)
        so = self.sampler.sample(sampled, out)
        return StepResult(header.step_id, sampled, so.token_ids, so.logprobs, so.top_logprobs)

    def expert_load(self) -> list[ExpertLoad]:
        """Tokens per expert of this stage's MoE layers (rank 0's counts, which are the
        stage's: every rank of a stage routes the same tokens). Any thread may call it."""
        return self.executor.runner.expert_load()

    def shutdown(self) -> None:
        self.executor.shutdown()
