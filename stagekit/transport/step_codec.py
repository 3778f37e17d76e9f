"""Step headers and results as packed binary, for the UCX frame envelope.

Building and parsing a protobuf StepHeader costs microseconds per sequence in Python
(one sub-message each): for a 32-sequence decode step, more per hop than UCX needs to move
its 512 KiB of hidden states (docs/benchmarks.md, "Measurements behind design choices").
Here the per-sequence fields travel as columns, each packed by one ``struct`` call. The
widths are the protobuf's (ids int64, counts and block ids int32, logprobs float32), so
both data planes carry the same values.
The rare parts (sampling parameters of joining sequences, top logprobs) stay protobuf
bytes inside the header.

Header layout (little-endian): ``step_id i64 | n_seqs u32 | n_blocks u32 | n_freed u32 |
n_preempted u32 | extra_len u32``, then ``seq_id i64[n] | num_computed i32[n] |
num_new i32[n] | sample u8[n] | blocks_per_seq u32[n] | blocks i32[n_blocks] |
freed i64[] | preempted i64[]``, then ``extra`` (a StepHeader proto holding only new_seqs and dp_world).
Result layout: ``step_id i64 | n u32 | flags u8 | error_len u32 | tops_len u32``, then
``seq_ids i64[n] | token_ids i32[n] | logprobs f32[n]``, the UTF-8 error, and ``tops``
(a StepResult proto holding only top_logprobs).
"""

from __future__ import annotations

import struct

from stagekit.rpc import stage_proto
from stagekit.rpc.pb import stage_pb2
from stagekit.types.step import SeqSlice, StepHeader, StepResult

_HEADER = struct.Struct("<qIIIII")
_RESULT = struct.Struct("<qIBII")
_LINK_LOST = 1


def encode_header(h: StepHeader) -> bytes:
    seqs = h.seqs
    n = len(seqs)
    blocks = [b for s in seqs for b in s.new_blocks]
    extra = b""
    if h.new_seqs or h.dp_world:
        extra = stage_pb2.StepHeader(new_seqs=[
            stage_pb2.NewSeqSampling(seq_id=x.seq_id, sampling=stage_proto.sampling_to_proto(x.params))
            for x in h.new_seqs], dp_world=h.dp_world).SerializeToString()
    nf, npre = len(h.freed_seq_ids), len(h.preempted_seq_ids)
    try:
        body = struct.pack(
            f"<{n}q{n}i{n}i{n}B{n}I{len(blocks)}i{nf}q{npre}q",
            *[s.seq_id for s in seqs], *[s.num_computed for s in seqs], *[s.num_new for s in seqs],
            *[1 if s.sample else 0 for s in seqs], *[len(s.new_blocks) for s in seqs], *blocks,
            *h.freed_seq_ids, *h.preempted_seq_ids)
    except struct.error as e:
        raise ValueError(f"step {h.step_id} header does not fit its wire widths: {e}") from None
    return _HEADER.pack(h.step_id, n, len(blocks), nf, npre, len(extra)) + body + extra


def decode_header(raw: bytes | memoryview) -> StepHeader:
    step_id, n, nb, nf, npre, extra_len = _HEADER.unpack_from(raw, 0)
    fmt = f"<{n}q{n}i{n}i{n}B{n}I{nb}i{nf}q{npre}q"
    off = _HEADER.size + struct.calcsize(fmt)
    if off + extra_len != len(raw):
        raise ValueError(f"corrupt step header: {len(raw)} bytes where {off + extra_len} were due")
    v = struct.unpack_from(fmt, raw, _HEADER.size)
    ids, computed, new, sample, counts = v[:n], v[n:2 * n], v[2 * n:3 * n], v[3 * n:4 * n], v[4 * n:5 * n]
    blocks, rest = v[5 * n:5 * n + nb], v[5 * n + nb:]
    if sum(counts) != nb:
        raise ValueError("corrupt step header: block counts do not add up")
    seqs, at = [], 0
    for i in range(n):
        k = counts[i]
        seqs.append(SeqSlice(ids[i], computed[i], new[i], sample[i] != 0, blocks[at:at + k]))
        at += k
    new_seqs, dp_world = [], 0
    if extra_len:
        p = stage_pb2.StepHeader.FromString(bytes(raw[off:off + extra_len]))
        new_seqs, dp_world = stage_proto.header_from_proto(p).new_seqs, p.dp_world
    return StepHeader(step_id, seqs, list(rest[:nf]), new_seqs, list(rest[nf:]), dp_world)


def encode_result(r: StepResult) -> bytes:
    n = len(r.seq_ids)
    if len(r.token_ids) != n or len(r.logprobs) != n:
        raise ValueError(f"step {r.step_id} result: seq_ids, token_ids and logprobs differ in length")
    err = r.error.encode()
    tops = stage_pb2.StepResult(top_logprobs=stage_proto.tops_to_proto(r.top_logprobs)).SerializeToString() \
        if r.top_logprobs else b""
    try:
        body = struct.pack(f"<{n}q{n}i{n}f", *r.seq_ids, *r.token_ids, *r.logprobs)
    except struct.error as e:
        raise ValueError(f"step {r.step_id} result does not fit its wire widths: {e}") from None
    return _RESULT.pack(r.step_id, n, _LINK_LOST if r.link_lost else 0, len(err), len(tops)) + body + err + tops


def decode_result(raw: bytes | memoryview) -> StepResult:
    step_id, n, flags, err_len, tops_len = _RESULT.unpack_from(raw, 0)
    fmt = f"<{n}q{n}i{n}f"
    off = _RESULT.size + struct.calcsize(fmt)
    if off + err_len + tops_len != len(raw):
        raise ValueError(f"corrupt step result: {len(raw)} bytes where {off + err_len + tops_len} were due")
    v = struct.unpack_from(fmt, raw, _RESULT.size)
    error = bytes(raw[off:off + err_len]).decode()
    tops: list[list[tuple[int, float]]] = []
    if tops_len:
        p = stage_pb2.StepResult.FromString(bytes(raw[off + err_len:off + err_len + tops_len]))
        tops = stage_proto.result_from_proto(p).top_logprobs
    return StepResult(step_id, list(v[:n]), list(v[n:2 * n]), list(v[2 * n:]), tops, error,
                      bool(flags & _LINK_LOST))
