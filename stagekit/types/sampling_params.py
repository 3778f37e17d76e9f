"""Sampling parameters of one request (domain type; the proto lives at the edge)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from stagekit.errors import InvalidRequest

# Temperatures a sampler can use: 0 (greedy) or [MIN_TEMPERATURE, MAX_TEMPERATURE]. Below 0.01
# the scaled logits overflow float32 for ordinary logit sizes (vLLM clamps such values to 0.01;
# we refuse them, so a request never samples other than it asked); above 100 sampling is
# uniform noise, and from ~3.4e38 the scale itself is infinite in float32.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 1e2
# The stage API carries float32: 0.01 arrives as 0.0099999998, so the bounds give that much room.
_F32_SLACK = 1e-6
# Seeds a torch generator takes (the stage API's seed is an int64).
SEED_RANGE = (-(2**63), 2**63)


def temperature_rule() -> str:
    return f"0 (greedy) or between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}"


def temperature_ok(value: float) -> bool:
    """Whether a sampler can use ``value`` as a temperature (see MIN_TEMPERATURE)."""
    lo, hi = MIN_TEMPERATURE * (1 - _F32_SLACK), MAX_TEMPERATURE * (1 + _F32_SLACK)
    return value == 0.0 or (math.isfinite(value) and lo <= value <= hi)


def covers_vocabulary(suppressed: Sequence[int], vocab_size: int) -> bool:
    """Whether masking ``suppressed`` (stop ids and EOS while ``min_tokens`` holds) leaves no token."""
    return vocab_size > 0 and len({t for t in suppressed if 0 <= t < vocab_size}) >= vocab_size


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """``temperature == 0`` is greedy, otherwise within [MIN_TEMPERATURE, MAX_TEMPERATURE];
    ``top_p`` in (0, 1] (1 = off); ``top_k`` <= 0 = off. The same ``seed`` gives the same
    tokens for the same prompt: the token at output position i is drawn from a value that
    depends only on (seed, i). ``seed_offset`` is the output position of this call's first
    token: a request continued elsewhere (migration: the tokens so far appended to its prompt)
    sets it to the number of tokens already generated, so that it draws what the original
    would have drawn. ``validate`` holds the rules a sampler needs."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    top_logprobs: int = 0
    seed_offset: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int = 0, eos_token_ids: Sequence[int] = ()) -> None:
        """Raise `InvalidRequest` (naming the field) for values no sampler can use; with the
        model's ``vocab_size`` (and EOS ids) also for token ids outside it."""
        if self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        if not temperature_ok(self.temperature):
            raise InvalidRequest(f"temperature must be {temperature_rule()}, got {self.temperature}",
                                 param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
                                 param="min_tokens")
        if self.top_logprobs < 0:
            raise InvalidRequest(f"top_logprobs must be >= 0, got {self.top_logprobs}", param="top_logprobs")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise InvalidRequest(f"seed must fit in a signed 64-bit integer, got {self.seed}", param="seed")
        if self.seed_offset < 0:
            raise InvalidRequest(f"seed_offset must be >= 0, got {self.seed_offset}", param="seed_offset")
        if vocab_size > 0:
            self._validate_vocab(vocab_size, eos_token_ids)

    def _validate_vocab(self, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest(f"stop token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                                 param="stop_token_ids")
        if self.top_logprobs > vocab_size:
            raise InvalidRequest(f"top_logprobs {self.top_logprobs} exceeds the vocabulary size {vocab_size}",
                                 param="top_logprobs")
        if self.min_tokens > 0 and covers_vocabulary((*self.stop_token_ids, *eos_token_ids), vocab_size):
            raise InvalidRequest(
                f"stop_token_ids and the EOS tokens cover the whole vocabulary ({vocab_size} tokens): with "
                f"min_tokens={self.min_tokens} every token is masked and nothing could be sampled",
                param="stop_token_ids",
            )
