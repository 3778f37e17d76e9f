"""Sampling parameters of one request (domain type; the proto lives at the edge)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stagekit.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """``temperature == 0`` is greedy; ``top_p`` in (0, 1] (1 = off); ``top_k`` <= 0 = off.
    The same ``seed`` gives the same tokens for the same prompt: the token at output position
    i is drawn from a value that depends only on (seed, i). ``seed_offset`` is the output
    position of this call's first token: a request continued elsewhere (migration: the tokens
    so far appended to its prompt) sets it to the number of tokens already generated, so that
    it draws what the original would have drawn."""

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

    def validate(self) -> None:
        if self.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise InvalidRequest(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.top_logprobs < 0:
            raise InvalidRequest(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if self.seed_offset < 0:
            raise InvalidRequest(f"seed_offset must be >= 0, got {self.seed_offset}")
