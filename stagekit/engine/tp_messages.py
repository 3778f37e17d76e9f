"""What rank 0 and its TP workers say over the pipe between them. Only metadata goes this
way; tensors go over the TP group (a broadcast, or an all-gather for a KV read), each side
building or filling them from the shapes named here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stagekit.types.pickling import reduce_by_fields
from stagekit.types.step import IntermediateTensors, StepInputs


@dataclass(slots=True)
class TensorsMeta:
    """Shape and dtype of a step's IntermediateTensors, so a worker can allocate the buffers
    that rank 0's broadcasts fill: hidden states, then the residual if there is one."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    has_residual: bool

    __reduce__ = reduce_by_fields

    @classmethod
    def of(cls, t: IntermediateTensors) -> TensorsMeta:
        return cls(tuple(t.hidden_states.shape), t.hidden_states.dtype, t.residual is not None)


@dataclass(slots=True)
class RunStep:
    """Run ``step`` (sent without its tensors; ``tensors`` says what the broadcasts carry)."""

    step: StepInputs
    tensors: TensorsMeta | None

    __reduce__ = reduce_by_fields


@dataclass(frozen=True, slots=True)
class ReadKv:
    """Gather this rank's KV of ``blocks`` to rank 0 (``TPExecutor.read_kv``)."""

    blocks: list[int]


@dataclass(frozen=True, slots=True)
class WriteKv:
    """Take every rank's KV from rank 0's broadcast ([tp, ...] of ``shape`` and ``dtype``) and
    write this rank's share into ``blocks`` (``TPExecutor.write_kv``)."""

    blocks: list[int]
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class Stop:
    """Close the process groups and exit."""


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """Worker to rank 0: the shard is loaded and the worker waits for steps."""


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    """Worker to rank 0: start-up failed with ``detail``; the worker has exited."""

    detail: str


ToWorker = RunStep | ReadKv | WriteKv | Stop
FromWorker = WorkerReady | WorkerFailed
