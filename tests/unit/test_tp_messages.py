"""The messages rank 0 sends its TP workers survive the pipe's pickling whole: every field
of the step (the header's sequences, freed and preempted ids, new sequences' sampling
parameters, the input ids) arrives, and the fast constructor-call pickling stays valid
for every class that uses it (its fields are exactly its __init__ arguments)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from stagekit.engine.tp_messages import ReadKv, RunStep, Stop, TensorsMeta, WorkerFailed, WriteKv
from stagekit.types.pickling import reduce_by_fields
from stagekit.types.sampling_params import SamplingParams
from stagekit.types.step import IntermediateTensors, NewSeq, SeqSlice, StepHeader, StepInputs


def _roundtrip(obj: object) -> object:
    return pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def test_a_step_crosses_the_pipe_whole() -> None:
    header = StepHeader(
        step_id=7,
        seqs=[SeqSlice(1, 0, 3, sample=True, new_blocks=(4, 5)), SeqSlice(2, 9, 1, sample=False)],
        freed_seq_ids=[3], new_seqs=[NewSeq(1, SamplingParams(temperature=0.5, seed=11))],
        preempted_seq_ids=[6],
    )
    hidden = torch.randn(4, 8, dtype=torch.bfloat16)
    step = StepInputs(header, input_ids=[10, 11, 12, 13], intermediate=IntermediateTensors(hidden, None))
    sent = RunStep(dataclasses.replace(step, intermediate=None), TensorsMeta.of(step.intermediate))
    got = _roundtrip(sent)
    assert got == sent and got.step.header == header and got.step.intermediate is None
    assert got.tensors == TensorsMeta((4, 8), torch.bfloat16, False)
    assert step.intermediate is not None  # the caller's step is not touched


@pytest.mark.parametrize("msg", [ReadKv([1, 2]), WriteKv([3], (2, 1, 2, 1, 1, 16, 4), torch.float16), Stop(),
                                 WorkerFailed("OSError: no weights")])
def test_control_messages_roundtrip(msg: object) -> None:
    assert _roundtrip(msg) == msg


@pytest.mark.parametrize("cls", [SeqSlice, StepHeader, StepInputs, RunStep, TensorsMeta])
def test_constructor_pickling_matches_the_fields(cls: type) -> None:
    assert cls.__reduce__ is reduce_by_fields
    assert cls.__slots__ == tuple(f.name for f in dataclasses.fields(cls) if f.init)
