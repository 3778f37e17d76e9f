"""What every stage does with one step, head or not: free finished sequences, register
the sampling parameters of new ones, run the layers on all TP ranks, and on the last
stage sample. Runs on the stage's compute thread (it blocks on collectives). A stage of a
data-parallel-attention group also checks that the step belongs to its group's current
world, and rejoins the group after a failure (engine/dp_member.py)."""

from __future__ import annotations

import logging
import time

import torch

from stagekit.engine.dp_member import DpMember
from stagekit.engine.sampler import Sampler
from stagekit.engine.stage_spec import StageSpec
from stagekit.engine.stats import StageStats
from stagekit.engine.tp_executor import TPExecutor
from stagekit.errors import ConfigError, StageUnavailable
from stagekit.parallel.dp_rendezvous import RendezvousCancelled
from stagekit.types.expert_load import ExpertLoad
from stagekit.types.step import IntermediateTensors, StepHeader, StepInputs, StepResult

log = logging.getLogger(__name__)


def start_executor(spec: StageSpec, dp: DpMember | None = None) -> TPExecutor:
    """The stage's TP ranks, started; in a DP group, joined to the group's next world (knocking
    again while a formation fails: a member that died while it formed). The caller marks
    ``dp`` formed once the executor is in place."""
    if dp is None:
        return TPExecutor(spec)
    while True:
        try:
            executor = TPExecutor(spec, rendezvous=dp.rendezvous, cancel=dp.cancel)
            break
        except (RendezvousCancelled, ConfigError):
            raise
        except Exception as e:
            log.warning("DP group %s: joining the next epoch failed (%s); knocking again", spec.dp_group, e)
            if dp.cancel.wait(1.0):
                raise RendezvousCancelled("the stage is stopping") from e
    return executor


class StageRuntime:
    """Wraps the TP executor with the step protocol; owns the sampler on the last stage."""

    def __init__(self, executor: TPExecutor, dp: DpMember | None = None) -> None:
        """``dp``: the stage's DP-group membership; marked formed here (the executor joined)."""
        self.executor, self.dp = executor, dp
        self.spec = executor.spec
        runner = executor.runner
        self.cfg, self.layout, self.dtype = runner.cfg, runner.layout, runner.dtype
        self.kv_cache = runner.kv_cache
        self.sampler = Sampler(self.cfg.eos_token_ids) if self.layout.is_last else None
        self.stats = StageStats()
        if dp is not None:
            dp.formed(executor.epoch)

    def process(self, step: StepInputs) -> IntermediateTensors | StepResult | None:
        """Run one step. Returns the tensors for the next stage, or on the last stage the
        sampled tokens; None for a step with no sequences on a middle stage."""
        header = step.header
        if self.dp is not None:
            self._check_world(header)
        if self.sampler is not None:
            self.sampler.remove(header.freed_seq_ids)
            for ns in header.new_seqs:
                self.sampler.add(ns.seq_id, ns.params)
        started = time.perf_counter()
        try:
            out = self.executor.execute(step)
        except Exception as e:
            self.stats.step_failures_total += 1
            if self.dp is not None:  # its peers are now in a collective it never finished
                self.dp.fail(f"step {header.step_id} failed on layers {self.layout.start_layer}:"
                             f"{self.layout.end_layer}: {e}")
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

    def _check_world(self, header: StepHeader) -> None:
        """A step enters the group's collectives only in the world its head stepped in."""
        assert self.dp is not None
        if not self.dp.ready:
            raise StageUnavailable(f"step {header.step_id}: the DP group is forming: {self.dp.detail}")
        if header.dp_world != self.executor.world_id:
            raise StageUnavailable(f"step {header.step_id} was issued in another world of the DP group than this "
                                   f"stage's (epoch {self.executor.epoch}): the group re-formed since")

    def rejoin(self) -> None:
        """Leave the failed world and join the group's next one (the compute thread; blocks
        until every member is back or the stage stops). The KV pool and sampling state start
        empty: the head failed every request they held."""
        dp = self.dp
        if dp is None or dp.ready:
            return
        dp.wait_round_idle()
        self.executor.shutdown()
        executor = start_executor(self.spec, dp)
        self.executor = executor
        self.kv_cache = executor.runner.kv_cache
        if self.sampler is not None:
            self.sampler = Sampler(self.cfg.eos_token_ids)
        dp.formed(executor.epoch)

    def expert_load(self) -> list[ExpertLoad]:
        """Tokens per expert of this stage's MoE layers (rank 0's counts, which are the
        stage's: every rank of a stage routes the same tokens). Any thread may call it."""
        return self.executor.runner.expert_load()

    def shutdown(self) -> None:
        self.executor.shutdown()
