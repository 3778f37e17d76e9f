"""Proto <-> domain conversions. Only this module (and servicers/clients) touch *_pb2."""

from __future__ import annotations

import math

import torch

from stagekit.errors import InvalidRequest
from stagekit.rpc.pb import common_pb2, stage_pb2
from stagekit.types.sampling_params import SamplingParams
from stagekit.types.step import Frame, NewSeq, SeqSlice, StepHeader, StepResult

_DTYPES = {
    torch.float32: common_pb2.DTYPE_FLOAT32,
    torch.float16: common_pb2.DTYPE_FLOAT16,
    torch.bfloat16: common_pb2.DTYPE_BFLOAT16,
    torch.int64: common_pb2.DTYPE_INT64,
    torch.int32: common_pb2.DTYPE_INT32,
    torch.int16: common_pb2.DTYPE_INT16,
    torch.int8: common_pb2.DTYPE_INT8,
    torch.uint8: common_pb2.DTYPE_UINT8,
    torch.bool: common_pb2.DTYPE_BOOL,
}
_FROM_PROTO = {v: k for k, v in _DTYPES.items()}


def dtype_to_proto(dtype: torch.dtype) -> int:
    return _DTYPES[dtype]


def dtype_from_proto(value: int) -> torch.dtype:
    if value not in _FROM_PROTO:
        raise InvalidRequest(f"unsupported tensor dtype {value}")
    return _FROM_PROTO[value]


def tensor_to_proto(t: torch.Tensor) -> common_pb2.Tensor:
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return common_pb2.Tensor(dtype=_DTYPES[t.dtype], shape=list(t.shape), data=raw.numpy().tobytes())


def tensor_from_proto(p: common_pb2.Tensor) -> torch.Tensor:
    if p.dtype not in _FROM_PROTO:
        raise InvalidRequest(f"unsupported tensor dtype {p.dtype}")
    dtype = _FROM_PROTO[p.dtype]
    shape = tuple(p.shape)
    if any(d < 0 for d in shape):
        raise InvalidRequest(f"tensor shape {list(shape)[:8]} has a negative dimension")
    # the bytes must be exactly the shape's: a frame from a peer is checked, never trusted (nor is
    # a shape without data allocated)
    if math.prod(shape) * dtype.itemsize != len(p.data):
        raise InvalidRequest(f"a {dtype} tensor of shape {list(shape)[:8]} takes "
                             f"{math.prod(shape) * dtype.itemsize} bytes, not the {len(p.data)} sent")
    if not p.data:
        return torch.empty(shape, dtype=dtype)
    buf = bytearray(p.data)  # writable copy: the fallback path copies anyway
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def sampling_to_proto(s: SamplingParams) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
        min_tokens=s.min_tokens, stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
        top_logprobs=s.top_logprobs, seed_offset=s.seed_offset,
    )
    if s.seed is not None:
        p.seed = s.seed
    return p


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None, max_tokens=p.max_tokens, min_tokens=p.min_tokens,
        stop_token_ids=tuple(p.stop_token_ids), ignore_eos=p.ignore_eos, top_logprobs=p.top_logprobs,
        seed_offset=p.seed_offset,
    )


def _tops_to_proto(tops: list[list[tuple[int, float]]]) -> list[stage_pb2.TokenLogprobs]:
    return [stage_pb2.TokenLogprobs(top=[stage_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in row])
            for row in tops]


def _tops_from_proto(rows: list[stage_pb2.TokenLogprobs]) -> list[list[tuple[int, float]]]:
    return [[(e.token_id, e.logprob) for e in row.top] for row in rows]


def header_to_proto(h: StepHeader) -> stage_pb2.StepHeader:
    return stage_pb2.StepHeader(
        step_id=h.step_id,
        seqs=[stage_pb2.StepSeq(seq_id=s.seq_id, num_computed=s.num_computed, num_new=s.num_new, sample=s.sample,
                                new_blocks=s.new_blocks) for s in h.seqs],
        freed_seq_ids=h.freed_seq_ids,
        new_seqs=[stage_pb2.NewSeqSampling(seq_id=n.seq_id, sampling=sampling_to_proto(n.params))
                  for n in h.new_seqs],
        preempted_seq_ids=h.preempted_seq_ids,
        dp_world=h.dp_world,
    )


def header_from_proto(p: stage_pb2.StepHeader) -> StepHeader:
    return StepHeader(
        step_id=p.step_id,
        seqs=[SeqSlice(s.seq_id, s.num_computed, s.num_new, s.sample, tuple(s.new_blocks)) for s in p.seqs],
        freed_seq_ids=list(p.freed_seq_ids),
        new_seqs=[NewSeq(n.seq_id, sampling_from_proto(n.sampling)) for n in p.new_seqs],
        preempted_seq_ids=list(p.preempted_seq_ids),
        dp_world=p.dp_world,
    )


def result_to_proto(r: StepResult) -> stage_pb2.StepResult:
    return stage_pb2.StepResult(
        step_id=r.step_id, seq_ids=r.seq_ids, token_ids=r.token_ids, logprobs=r.logprobs,
        top_logprobs=_tops_to_proto(r.top_logprobs), error=r.error, link_lost=r.link_lost,
    )


def result_from_proto(p: stage_pb2.StepResult) -> StepResult:
    return StepResult(
        step_id=p.step_id, seq_ids=list(p.seq_ids), token_ids=list(p.token_ids), logprobs=list(p.logprobs),
        top_logprobs=_tops_from_proto(list(p.top_logprobs)), error=p.error, link_lost=p.link_lost,
    )


def frame_to_proto(f: Frame) -> stage_pb2.Frame:
    p = stage_pb2.Frame(tensors=[tensor_to_proto(t) for t in f.tensors])
    if f.step is not None:
        p.step.CopyFrom(header_to_proto(f.step))
    if f.result is not None:
        p.result.CopyFrom(result_to_proto(f.result))
    return p


def frame_from_proto(p: stage_pb2.Frame) -> Frame:
    kind = p.WhichOneof("kind")
    return Frame(
        step=header_from_proto(p.step) if kind == "step" else None,
        result=result_from_proto(p.result) if kind == "result" else None,
        tensors=[tensor_from_proto(t) for t in p.tensors],
    )


def tops_to_proto(tops: list[list[tuple[int, float]]]) -> list[stage_pb2.TokenLogprobs]:
    return _tops_to_proto(tops)


