"""A generation request as the head's scheduler tracks it."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from stagekit.types.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # holds its blocks; another replica fills some
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class TokenOutput:
    """Tokens produced for a request since its previous output; ``finish_reason`` is set
    on the last one ("stop", "length", "abort") and ``error`` when it failed."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    error: Exception | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


@dataclass(eq=False, slots=True)
class Sequence:
    """Invariant: ``num_computed`` tokens of ``prompt_ids + output_ids`` are in every
    stage's KV cache; the next step feeds the rest."""

    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    in_flight: bool = False  # part of a step that has not come back yet
    prompt_hashes: list[int] = field(default_factory=list)  # chained hashes of full prompt blocks
    block_ids: list[int] = field(default_factory=list)  # KV blocks in token order (same ids on every stage)
    num_sent_blocks: int = 0  # leading block_ids the stages already have in their tables
    num_named_blocks: int = 0  # leading prompt blocks registered with the prefix cache
    announced: bool = False  # the last stage has its sampling parameters
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def pending_token_ids(self) -> list[int]:
        return (self.prompt_ids + self.output_ids)[self.num_computed:]
