"""The step message: what flows down the pipeline each step, and what comes back.

A step header names the sequences of the batch (with how many tokens each adds and the
KV blocks their tables gain), the sequences to free or preempt first, and the sampling
parameters of sequences that join. The tensors
(hidden_states, residual) travel beside it on the data plane. The last stage answers
with a StepResult carrying one sampled token per sampled sequence. Inside a stage the
header and that stage's inputs travel together as one StepInputs, from where they meet
(the head's engine, a relay) down to every TP rank's model runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stagekit.types.pickling import reduce_by_fields
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

    __reduce__ = reduce_by_fields


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
    dp_world: int = 0  # data-parallel attention: the id of the group world this step belongs to (0: no group)

    __reduce__ = reduce_by_fields

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


@dataclass(slots=True)
class StepInputs:
    """One step as a stage computes it: the header (which sequences run, which to free or
    preempt first) and the stage's inputs, token ids on the first stage (``input_ids``, one
    per scheduled token, in ``header.seqs`` order) or the previous stage's tensors on the
    others (``intermediate``). Built once where the header and the inputs meet, then passed
    by reference down to ``ModelRunner.run`` and read-only below; a field added here reaches
    every TP rank (the workers get it over their pipe, tensors aside)."""

    header: StepHeader
    input_ids: list[int] | None = None
    intermediate: IntermediateTensors | None = None

    __reduce__ = reduce_by_fields
