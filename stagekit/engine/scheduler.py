"""The head's scheduler: which sequences run in the next step, in which KV blocks.

Continuous batching over a paged KV cache. Every running sequence decodes one token per
step; waiting ones are admitted first come, first served while the free blocks hold their
tokens (after the blocks a cached prefix already provides); prompts longer than what is
left of the step's token budget are prefilled in chunks. A sequence that needs a new block
when none is free takes it from the most recently admitted sequence that is not in flight:
that one is preempted (its blocks released, its KV dropped on every stage) and goes back
to the front of the queue, to be recomputed from its prompt and the tokens it already has.
Sequences are split into micro-batches so that a pipeline of n stages has n steps in flight.
A sequence whose prompt KV another replica computes (prefill/decode disaggregation) waits
for it with its blocks reserved and is never scheduled meanwhile; when the KV has arrived
it runs and prefills only the rest, and when the transfer failed it waits again like any
new sequence (full recompute).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from stagekit.engine.block_manager import BlockManager
from stagekit.engine.prefix_cache import BLOCK_SIZE, block_hashes
from stagekit.engine.sequence import Sequence, SequenceStatus
from stagekit.types.step import NewSeq, SeqSlice, StepHeader, StepResult


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
    """Invariant: a running sequence's ``block_ids`` hold at least its ``num_computed``
    tokens; a waiting one holds no blocks; one waiting for remote KV (``remote``) holds blocks
    for all its tokens and is in no step."""

    def __init__(self, num_blocks: int, max_model_len: int, eos_token_ids: list[int],
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 8192, block_size: int = BLOCK_SIZE,
                 prefix_caching: bool = True, first_step_id: int = 1) -> None:
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self.remote: dict[int, Sequence] = {}   # waiting for remote KV, by seq_id
        self.num_preemptions = 0
        self._to_free: list[int] = []
        self._to_preempt: list[int] = []
        self._step_id = first_step_id - 1

    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    @property
    def watermark_blocks(self) -> int:
        """Blocks admission leaves free for running sequences to grow into (1%)."""
        return self.blocks.num_blocks // 100

    @property
    def max_seq_tokens(self) -> int:
        """The most tokens one sequence can hold: what admission can ever give it."""
        return (self.blocks.num_blocks - self.watermark_blocks) * self.blocks.block_size

    def reset_blocks(self, num_blocks: int, prefix_caching: bool) -> None:
        """Use a pool of ``num_blocks`` (the pipeline's smallest); with the same pool only
        the prefix names are dropped (the stages may have been replaced), and the blocks
        running sequences and KV imports hold stay theirs. Callers fail the running
        sequences first when the pool size changes."""
        if num_blocks == self.blocks.num_blocks:
            self.blocks.forget_hashes()
            self.blocks.prefix_caching = prefix_caching and num_blocks > 0
        else:
            assert not self.running, "fail the running sequences before resizing the KV pool"
            self.blocks = BlockManager(num_blocks, self.blocks.block_size, prefix_caching)
            for seq in list(self.remote.values()):   # their blocks are gone: the KV cannot land
                self._unreserve(seq, release=False)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._to_free or self._to_preempt)

    def admit_for_remote_kv(self, seq: Sequence) -> bool:
        """Admit ``seq`` to wait for KV another replica computes: blocks for all its tokens
        are reserved now (a cached prompt prefix counts, as at admission), it is in no step
        until ``remote_kv_arrived`` or ``remote_kv_failed``. False: no room now (not added)."""
        if len(self.running) + len(self.remote) >= self.max_num_seqs or not self._reserve(seq):
            return False
        seq.status = SequenceStatus.WAITING_FOR_REMOTE_KV
        self.remote[seq.seq_id] = seq
        return True

    def remote_kv_arrived(self, seq_id: int, num_computed: int) -> Sequence:
        """Every stage holds the KV of the first ``num_computed`` tokens of a sequence waiting
        for remote KV, in its blocks: it runs, and its next step prefills only the rest (at
        least one token, so the last stage has a position to sample from)."""
        seq = self._remote(seq_id)
        if not seq.num_computed <= num_computed < seq.num_tokens:
            raise ValueError(f"sequence {seq_id}: remote KV of {num_computed} tokens for a sequence of "
                             f"{seq.num_tokens} with {seq.num_computed} cached here")
        del self.remote[seq_id]
        seq.num_computed = num_computed
        seq.status = SequenceStatus.RUNNING
        self.running[seq_id] = seq
        return seq

    def remote_kv_failed(self, seq_id: int) -> Sequence:
        """The remote KV will not come: the sequence waits again, first in line, holding no
        blocks, to be prefilled here in full."""
        seq = self._remote(seq_id)
        self._unreserve(seq, release=True)
        return seq

    def _remote(self, seq_id: int) -> Sequence:
        seq = self.remote.get(seq_id)
        if seq is None:
            raise ValueError(f"sequence {seq_id} is not waiting for remote KV")
        return seq

    def _unreserve(self, seq: Sequence, release: bool) -> None:
        self.remote.pop(seq.seq_id, None)
        if release:
            self.blocks.release(seq.block_ids)
        seq.block_ids, seq.num_sent_blocks, seq.num_computed, seq.num_named_blocks = [], 0, 0, 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in list(self.remote.values()):
            if seq.request_id == request_id:
                self._drop_remote(seq)
                return seq
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._drop_waiting(seq)
                return seq
        for seq in list(self.running.values()):
            if seq.request_id == request_id:
                self.finish(seq)
                return seq
        return None

    def _drop_waiting(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        if seq.announced:  # a preempted sequence: the last stage still has its sampler state
            self._to_free.append(seq.seq_id)

    def _drop_remote(self, seq: Sequence) -> None:
        del self.remote[seq.seq_id]
        self.blocks.release(seq.block_ids)
        seq.block_ids = []
        self._drop_waiting(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a running sequence out; its KV is freed on every stage with the next step."""
        if self.running.pop(seq.seq_id, None) is not None:
            self.blocks.release(seq.block_ids)
            seq.block_ids = []
            self._to_free.append(seq.seq_id)
        seq.status = SequenceStatus.FINISHED

    def schedule(self, num_microbatches: int = 1) -> StepHeader | None:
        """The next step: running sequences not already in flight (decodes and unfinished
        prompt chunks first, in admission order), then waiting ones admitted FCFS while
        the free blocks hold them. At most ``max_num_batched_tokens`` tokens; a prompt
        longer than what is left of the budget is split into chunks (sampled only after
        its last chunk). With ``num_microbatches`` > 1 each step takes about 1/n of the
        sequences so that that many steps can be in flight down the pipeline at once."""
        budget = self.max_num_batched_tokens
        cap = max(1, -(-(len(self.running) + len(self.waiting)) // num_microbatches))
        seqs: list[SeqSlice] = []
        new: list[NewSeq] = []
        for seq in list(self.running.values()):
            if len(seqs) >= cap or budget <= 0:
                break
            if seq.in_flight or seq.seq_id not in self.running:  # in a step, or just preempted
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + n):
                continue
            self._announce(seq, new)   # one that joined from waiting for remote KV is not yet
            seqs.append(self._slice(seq, n))
            budget -= n
        while (self.waiting and len(self.running) + len(self.remote) < self.max_num_seqs and len(seqs) < cap
               and budget > 0):
            seq = self.waiting[0]
            if not self._admit(seq):
                break
            self.waiting.popleft()
            self._announce(seq, new)
            n = min(seq.num_tokens - seq.num_computed, budget)
            seqs.append(self._slice(seq, n))
            budget -= n
        if not seqs and not self._to_free and not self._to_preempt:
            return None
        self._step_id += 1
        freed, self._to_free = self._to_free, []
        preempted, self._to_preempt = self._to_preempt, []
        return StepHeader(self._step_id, seqs, freed, new, preempted)

    def empty_step(self) -> StepHeader:
        """A step with no sequences: a DP-attention group's dummy step (engine.py)."""
        self._step_id += 1
        return StepHeader(self._step_id, [])

    @staticmethod
    def _announce(seq: Sequence, new: list[NewSeq]) -> None:
        if not seq.announced:
            new.append(NewSeq(seq.seq_id, seq.params))
            seq.announced = True

    def _admit(self, seq: Sequence) -> bool:
        if not self._reserve(seq):
            return False
        seq.status = SequenceStatus.RUNNING
        self.running[seq.seq_id] = seq
        return True

    def _reserve(self, seq: Sequence) -> bool:
        """Give ``seq`` blocks for all its tokens (a cached prompt prefix counts, leaving at
        least one prompt token to compute so the last stage has a position to sample from)."""
        bm = self.blocks
        hits: list[int] = []
        if bm.prefix_caching:
            if not seq.prompt_hashes:
                seq.prompt_hashes = block_hashes(seq.prompt_ids, bm.block_size)
            usable = seq.prompt_hashes[: (len(seq.prompt_ids) - 1) // bm.block_size]
            hits = bm.match(usable)
        need = bm.blocks_for(seq.num_tokens) - len(hits)
        if bm.cost(hits, need) > bm.num_free - self.watermark_blocks:
            return False
        if bm.prefix_caching:
            bm.count_query(len(seq.prompt_ids), len(hits))
        bm.take(hits)
        seq.block_ids = hits + bm.allocate(need)
        seq.num_sent_blocks = 0
        seq.num_named_blocks = len(hits)
        seq.num_computed = len(hits) * bm.block_size
        return True

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make ``seq``'s blocks hold ``num_tokens``, preempting later-admitted sequences
        that are not in flight when the pool is full. False: not now (try next step)."""
        need = self.blocks.blocks_for(num_tokens) - len(seq.block_ids)
        if need <= 0:
            return True
        while self.blocks.num_free < need:
            order = list(self.running.values())
            later = order[order.index(seq) + 1:]
            victim = next((v for v in reversed(later) if not v.in_flight), None)
            if victim is None:
                return False
            self._preempt(victim)
        seq.block_ids += self.blocks.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        del self.running[seq.seq_id]
        self.blocks.release(seq.block_ids)
        seq.block_ids, seq.num_sent_blocks, seq.num_computed, seq.num_named_blocks = [], 0, 0, 0
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        self._to_preempt.append(seq.seq_id)

    @staticmethod
    def _slice(seq: Sequence, n: int) -> SeqSlice:
        remaining = seq.num_tokens - seq.num_computed
        seq.in_flight = True
        new_blocks = tuple(seq.block_ids[seq.num_sent_blocks:])
        seq.num_sent_blocks = len(seq.block_ids)
        return SeqSlice(seq.seq_id, seq.num_computed, n, sample=n == remaining, new_blocks=new_blocks)

    def postprocess(self, header: StepHeader, result: StepResult) -> StepOutcome:
        out = StepOutcome()
        for s in header.seqs:
            seq = self.running.get(s.seq_id)
            if seq is not None:
                seq.num_computed = s.num_computed + s.num_new
                seq.in_flight = False
                self._name_prompt_blocks(seq)
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

    def _name_prompt_blocks(self, seq: Sequence) -> None:
        """Prompt blocks now written on every stage become reusable under their hashes."""
        full = min(len(seq.prompt_hashes), seq.num_computed // self.blocks.block_size)
        for i in range(seq.num_named_blocks, full):
            self.blocks.register(seq.block_ids[i], seq.prompt_hashes[i])
        seq.num_named_blocks = max(seq.num_named_blocks, full)

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
        seqs = list(self.running.values()) + list(self.remote.values()) + list(self.waiting)
        for seq in list(self.running.values()):
            self.finish(seq)
        for seq in list(self.remote.values()):
            self._drop_remote(seq)
        for seq in self.waiting:
            self._drop_waiting(seq)
        self.waiting.clear()
        return seqs
