"""Token sampling on the last stage: greedy, temperature, top-k, top-p, per-request seeds,
min_tokens (EOS and stop ids suppressed until reached), sampled-token logprobs."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

import torch

from stagekit.engine.seeded_draws import race, seed_generator
from stagekit.types.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _SeqState:
    params: SamplingParams
    suppress: list[int]
    seed: int  # the request's, or one drawn here for a request without
    num_generated: int = 0

    @property
    def position(self) -> int:
        """The request's output position of the next token (across migrations)."""
        return self.params.seed_offset + self.num_generated


@dataclass(slots=True)
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


class Sampler:
    """Keeps each live sequence's sampling state; ``sample`` is called once per step with
    one logits row per sampled sequence. A sampled token depends only on its logits row, the
    sequence's parameters and seed, and its output position (``seeded_draws``): nothing
    drawn before it, so a preempted sequence recomputed later, or a request continued on
    another replica at its ``seed_offset``, gets the tokens an undisturbed run gets."""

    def __init__(self, eos_token_ids: list[int]) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self._seqs: dict[int, _SeqState] = {}
        self._generator = torch.Generator()  # re-seeded for every draw: holds no request's state

    def add(self, seq_id: int, params: SamplingParams) -> None:
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        suppress = sorted(set(self.eos_token_ids) | set(params.stop_token_ids))
        self._seqs[seq_id] = _SeqState(params, suppress, seed)

    def remove(self, seq_ids: list[int]) -> None:
        for s in seq_ids:
            self._seqs.pop(s, None)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def sample(self, seq_ids: list[int], logits: torch.Tensor) -> SampleOutput:
        # logits: [B, V] fp32, row i belongs to seq_ids[i]
        logprobs_all = torch.log_softmax(logits, dim=-1)
        tokens: list[int] = []
        for i, sid in enumerate(seq_ids):
            st = self._seqs[sid]
            row = logits[i]
            if st.num_generated < st.params.min_tokens and st.suppress:
                row = row.clone()
                row[[t for t in st.suppress if 0 <= t < row.numel()]] = float("-inf")
            tokens.append(self._pick_safely(sid, row, logits[i], st))
            st.num_generated += 1
        idx = torch.tensor(tokens, dtype=torch.int64)
        chosen = logprobs_all.gather(1, idx[:, None])[:, 0]
        out = SampleOutput(tokens, chosen.tolist())
        k = min(max((self._seqs[s].params.top_logprobs for s in seq_ids), default=0), logits.shape[-1])
        if k:
            vals, ids = logprobs_all.topk(k, dim=-1)
            out.top_logprobs = [
                list(zip(ids[i, : self._seqs[s].params.top_logprobs].tolist(),
                         vals[i, : self._seqs[s].params.top_logprobs].tolist(), strict=True))
                for i, s in enumerate(seq_ids)
            ]
        return out

    def _pick_safely(self, seq_id: int, row: torch.Tensor, raw: torch.Tensor, st: _SeqState) -> int:
        """``_pick``, or when ``row`` cannot be sampled (non-finite probabilities: parameters the
        stage's validation should have refused, or logits the model overflowed) the greedy token,
        so that one sequence never fails the step of every other. Greedy among the tokens
        ``row`` still allows if one is finite, else among the ``raw`` logits: always a token id."""
        try:
            return self._pick(row, st)
        except Exception as e:  # torch.multinomial: "probability tensor contains either inf, nan or element < 0"
            log.warning("sequence %d: could not sample (%s; temperature %r); took the greedy token",
                        seq_id, e, st.params.temperature)
        for candidates in (row, raw):
            finite = torch.isfinite(candidates)
            if bool(finite.any()):
                return int(candidates.masked_fill(~finite, float("-inf")).argmax())
        return 0

    def _pick(self, row: torch.Tensor, st: _SeqState) -> int:
        p = st.params
        if p.greedy:
            return int(row.argmax())
        row = row / p.temperature
        if p.top_k > 0 and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            cum = sorted_p.cumsum(0)
            drop = cum - sorted_p > p.top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return race(probs, seed_generator(self._generator, st.seed, st.position))
