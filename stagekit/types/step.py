"""The step message: what flows down the pipeline each step, and what comes back.

A step header names the sequences of the batch (with how many tokens each adds and the
KV blocks their tables gain), the sequences to free or preempt first, and the sampling
parameters of sequences that join. The tensors
(hidden_states, residual) travel beside it on the data plane. The last stage answers
with a StepResult carrying one sampled token per sampled sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stagekit.types.sampling_params import SamplingParams


@dataclass(slots=True)
class SeqSlice:
    """Tokens ``[num_computed, num_computed + num_new)`` of sequence ``seq_id``;
    ``new_blocks`` extend its block table before the step. Treated as immutable; not
    frozen because frozen dataclasses construct several times slower, and every step
    message builds one per sequence (docs/benchmarks.md, "Measurements behind design choices")."""

    seq_id: int
    num_computed: int
    num_new: int
    sample: bool = True
    new_blocks: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class NewSeq:
    seq_id: int
    params: SamplingParams


@dataclass(slots=True)
class StepHeader:
    step_id: int
    seqs: list[SeqSlice]
    freed_seq_ids: list[int] = field(default_factory=list)
    new_seqs: list[NewSeq] = field(default_factory=list)
    preempted_seq_ids: list[int] = field(default_factory=list)  # KV dropped; recomputed later

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.seqs)


@dataclass(slots=True)
class StepResult:
    step_id: int
    seq_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    error: str = ""
    link_lost: bool = False   # a notice, not a result: the ring is broken (see origin_steps)


@dataclass(slots=True)
class Frame:
    """One data-plane message: a step going down (with its tensors) or a result going back."""

    step: StepHeader | None = None
    result: StepResult | None = None
    tensors: list[torch.Tensor] = field(default_factory=list)


@dataclass(slots=True)
class IntermediateTensors:
    """What flows between stages: hidden states and the residual stream, both [T, hidden]."""

    hidden_states: torch.Tensor
    residual: torch.Tensor | None
