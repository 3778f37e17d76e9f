"""The packed step header/result of the UCX envelope carries exactly what the protobuf
carries (the gRPC data plane's format), and rejects what does not fit."""

from __future__ import annotations

import pytest

from stagekit.rpc import stage_proto
from stagekit.rpc.pb import stage_pb2
from stagekit.transport import step_codec
from stagekit.types.sampling_params import SamplingParams
from stagekit.types.step import NewSeq, SeqSlice, StepHeader, StepResult


def _via_proto_header(h: StepHeader) -> StepHeader:
    raw = stage_proto.header_to_proto(h).SerializeToString()
    return stage_proto.header_from_proto(stage_pb2.StepHeader.FromString(raw))


def _via_proto_result(r: StepResult) -> StepResult:
    raw = stage_proto.result_to_proto(r).SerializeToString()
    return stage_proto.result_from_proto(stage_pb2.StepResult.FromString(raw))


HEADERS = [
    StepHeader(0, []),
    StepHeader(7, [SeqSlice(1, 0, 5, False, (3, 4)), SeqSlice(2**40, 17, 1, True, ()), SeqSlice(3, 9, 1, True, (8,))],
               freed_seq_ids=[11, 2**50], preempted_seq_ids=[12],
               new_seqs=[NewSeq(3, SamplingParams(temperature=0.75, top_p=0.5, top_k=5, seed=42, max_tokens=9,
                                                  min_tokens=2, stop_token_ids=(1, 2), ignore_eos=True,
                                                  top_logprobs=3, seed_offset=7)),
                         NewSeq(4, SamplingParams())]),
    StepHeader(-3, [SeqSlice(i, 100 + i, 1, True, (i,) if i % 7 == 0 else ()) for i in range(64)]),
]


@pytest.mark.parametrize("header", HEADERS, ids=["empty", "mixed", "decode64"])
def test_header_round_trip_equals_the_protobuf_path(header: StepHeader) -> None:
    got = step_codec.decode_header(step_codec.encode_header(header))
    assert got == header == _via_proto_header(header)


RESULTS = [
    StepResult(5, [1, 2**40], [17, 0], [-0.5, -1.25]),
    StepResult(6, [3], [9], [-0.1], top_logprobs=[[(9, -0.1), (4, -2.5)]], error=""),
    StepResult(7, [], [], [], error="stage b: out of memory ünicode", link_lost=True),
]


@pytest.mark.parametrize("result", RESULTS, ids=["plain", "tops", "error"])
def test_result_round_trip_equals_the_protobuf_path(result: StepResult) -> None:
    got = step_codec.decode_result(step_codec.encode_result(result))
    # logprobs travel as float32 on both planes
    assert got == _via_proto_result(result)
    assert got.seq_ids == result.seq_ids and got.error == result.error and got.link_lost == result.link_lost


def test_values_beyond_the_wire_widths_are_rejected() -> None:
    with pytest.raises(ValueError, match="wire widths"):
        step_codec.encode_header(StepHeader(1, [SeqSlice(1, 2**31, 1)]))
    with pytest.raises(ValueError, match="wire widths"):
        step_codec.encode_result(StepResult(1, [1], [2**31], [0.0]))
    with pytest.raises(ValueError, match="differ in length"):
        step_codec.encode_result(StepResult(1, [1, 2], [3], [0.0]))


def test_corrupt_bytes_are_rejected() -> None:
    raw = step_codec.encode_header(HEADERS[1])
    with pytest.raises(ValueError, match="corrupt"):
        step_codec.decode_header(raw[:-1])
    with pytest.raises(ValueError, match="corrupt"):
        step_codec.decode_header(raw + b"x")
    res = step_codec.encode_result(RESULTS[2])
    with pytest.raises(ValueError, match="corrupt"):
        step_codec.decode_result(res[:-2])
