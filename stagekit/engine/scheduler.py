"""The head's scheduler: which sequences run in the next step.

FCFS admission by KV reservation (prompt + max_tokens must fit the free capacity, so a
running sequence never runs out of KV), every running sequence decodes one token per
step, newly admitted ones prefill in the same step, in chunks when the step's token budget
is short. Requests join and leave at every step. Sequences are split into micro-batches so
that a pipeline of n stages can have n steps in flight. (Paged blocks and preemption come
behind the same ``schedule``/``postprocess`` seam.)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from stagekit.engine.forward_batch import SeqSlice
from stagekit.engine.prefix_cache import PrefixIndex, PrefixOps, block_hashes
from stagekit.engine.sequence import Sequence, SequenceStatus
from stagekit.engine.step import NewSeq, StepHeader, StepResult


@dataclass(slots=True)
class Finished:
    seq: Sequence
    reason: str


@dataclass(slots=True)
class StepOutcome:
    """Per-sequence new tokens of one step and the sequences it finished."""

    emitted: list[tuple[Sequence, int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finished: list[Finished] = field(default_factory=list)


class Scheduler:
    def __init__(self, kv_capacity_tokens: int, max_model_len: int, eos_token_ids: list[int],
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 8192) -> None:
        self.kv_capacity_tokens = kv_capacity_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self.reserved_tokens = 0
        self._to_free: list[int] = []
        self._step_id = 0
        self.prefix = PrefixIndex(0)  # capacity set once the pipeline's stores are known
        self._prefix_ops = PrefixOps()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._to_free)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.status = SequenceStatus.FINISHED
                return seq
        for seq in list(self.running.values()):
            if seq.request_id == request_id:
                self.finish(seq)
                return seq
        return None

    def finish(self, seq: Sequence) -> None:
        """Take a running sequence out; its KV is freed on every stage with the next step."""
        if self.running.pop(seq.seq_id, None) is not None:
            self.reserved_tokens -= seq.kv_reservation
            self._to_free.append(seq.seq_id)
        seq.status = SequenceStatus.FINISHED

    def schedule(self, num_microbatches: int = 1) -> StepHeader | None:
        """The next step: running sequences not already in flight (decodes and unfinished
        prompt chunks first), then waiting ones admitted FCFS while their KV reservation
        fits. At most ``max_num_batched_tokens`` tokens; a prompt longer than what is left
        of the budget is split into chunks (sampled only after its last chunk). With
        ``num_microbatches`` > 1 each step takes about 1/n of the sequences so that that
        many steps can be in flight down the pipeline at once."""
        budget = self.max_num_batched_tokens
        cap = max(1, -(-(len(self.running) + len(self.waiting)) // num_microbatches))
        seqs: list[SeqSlice] = []
        new: list[NewSeq] = []
        for seq in self.running.values():
            if len(seqs) >= cap or budget <= 0:
                break
            if not seq.in_flight:
                seqs.append(self._slice(seq, budget))
                budget -= seqs[-1].num_new
        while self.waiting and len(self.running) < self.max_num_seqs and len(seqs) < cap and budget > 0:
            seq = self.waiting[0]
            if self.reserved_tokens + seq.kv_reservation > self.kv_capacity_tokens:
                break
            self.waiting.popleft()
            self.reserved_tokens += seq.kv_reservation
            seq.status = SequenceStatus.RUNNING
            self.running[seq.seq_id] = seq
            self._lookup_prefix(seq)
            seqs.append(self._slice(seq, budget))
            new.append(NewSeq(seq.seq_id, seq.params))
            budget -= seqs[-1].num_new
        if not seqs and not self._to_free:
            return None
        self._step_id += 1
        freed, self._to_free = self._to_free, []
        ops, self._prefix_ops = self._prefix_ops, PrefixOps()
        return StepHeader(self._step_id, seqs, freed, new, ops)

    def reset_prefix_cache(self, capacity_blocks: int) -> None:
        """Start an empty index (every stage drops its blocks with the next step)."""
        self.prefix = PrefixIndex(capacity_blocks)
        self._prefix_ops = PrefixOps(reset=True)

    def _lookup_prefix(self, seq: Sequence) -> None:
        """Start ``seq`` after its longest cached prefix (whole blocks, leaving at least one
        prompt token to compute so the last stage has a position to sample from)."""
        if not self.prefix.enabled:
            return
        seq.prompt_hashes = block_hashes(seq.prompt_ids, self.prefix.block_size)
        usable = seq.prompt_hashes[: (len(seq.prompt_ids) - 1) // self.prefix.block_size]
        n = self.prefix.match(usable, len(seq.prompt_ids))
        if n:
            seq.num_cached_blocks = n
            seq.num_computed = n * self.prefix.block_size
            self._prefix_ops.load.append((seq.seq_id, usable[:n]))

    def _cache_prompt_blocks(self, seq: Sequence) -> None:
        """The prompt's KV now exists on every stage: add its new full blocks to the cache."""
        ops = self._prefix_ops
        for i in range(seq.num_cached_blocks, len(seq.prompt_hashes)):
            evicted = self.prefix.insert(seq.prompt_hashes[i])
            if evicted is None:
                continue
            for h in evicted:
                pending = [x for x in ops.save if x[2] == h]
                if pending:  # saved and evicted before any stage saw it: drop the save
                    ops.save.remove(pending[0])
                else:
                    ops.evict.append(h)
            ops.save.append((seq.seq_id, i, seq.prompt_hashes[i]))

    @staticmethod
    def _slice(seq: Sequence, budget: int) -> SeqSlice:
        remaining = seq.num_tokens - seq.num_computed
        n = min(remaining, budget)
        seq.in_flight = True
        return SeqSlice(seq.seq_id, seq.num_computed, n, sample=n == remaining)

    def postprocess(self, header: StepHeader, result: StepResult) -> StepOutcome:
        out = StepOutcome()
        for s in header.seqs:
            seq = self.running.get(s.seq_id)
            if seq is not None:
                seq.num_computed = s.num_computed + s.num_new
                seq.in_flight = False
                if seq.prompt_hashes and s.num_computed < len(seq.prompt_ids) <= seq.num_computed:
                    self._cache_prompt_blocks(seq)
        tops = result.top_logprobs or [[] for _ in result.seq_ids]
        for sid, tok, lp, top in zip(result.seq_ids, result.token_ids, result.logprobs, tops, strict=True):
            seq = self.running.get(sid)
            if seq is None:  # aborted while the step was in flight
                continue
            seq.output_ids.append(tok)
            out.emitted.append((seq, tok, lp, top))
            reason = self._finish_reason(seq, tok)
            if reason:
                seq.finish_reason = reason
                self.finish(seq)
                out.finished.append(Finished(seq, reason))
        return out

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        p, n = seq.params, len(seq.output_ids)
        if n >= p.min_tokens:
            if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids):
                return "stop"
        if n >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def fail_all(self) -> list[Sequence]:
        """Take every sequence out (a stage failed); returns them so callers can be told."""
        seqs = list(self.running.values()) + list(self.waiting)
        for seq in list(self.running.values()):
            self.finish(seq)
        self.waiting.clear()
        return seqs
