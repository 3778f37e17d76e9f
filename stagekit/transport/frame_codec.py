"""The envelope of a data-plane frame: everything but the tensor bytes, in one small
buffer the receiver reads into a fixed-size, reused slot; the tensors follow as their own
messages, sent from and received into tensor memory.

Layout (little-endian): ``magic "SMF1" | kind u8 | flags u8 | num_tensors u16 | seq u32 |
header_len u32``, then per tensor ``dtype u8 | device u8 | ndim u16 | shape i64 * ndim``,
then the header (a StepHeader or StepResult packed by step_codec) unless it did not fit
(flag OVERFLOW): it then follows as a message of its own. Host tensors of at most
INLINE_BYTES in all travel inside the envelope, after the header (flag INLINE): below
UCX's rendezvous threshold UCX copies through a bounce buffer anyway, and one message
instead of several saves a round of posting and progress per frame.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from stagekit.errors import InvalidRequest
from stagekit.transport import step_codec
from stagekit.types.step import Frame

ENVELOPE_BYTES = 16 << 10
INLINE_BYTES = 8 << 10
MAX_TENSORS = 250
_MAGIC = b"SMF1"
_PREFIX = struct.Struct("<4sBBHII")
_TENSOR = struct.Struct("<BBH")
KIND_STEP, KIND_RESULT, KIND_EMPTY = 1, 2, 3
OVERFLOW, INLINE = 1, 2
DEVICE_CPU, DEVICE_CUDA = 0, 1

DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool,
)
_CODE = {dt: i for i, dt in enumerate(DTYPES)}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    cuda: bool

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class Envelope:
    kind: int
    seq: int
    specs: tuple[TensorSpec, ...]
    header: bytes        # empty when it overflowed
    header_len: int
    overflow: bool
    inline: list[torch.Tensor] | None   # the tensors, when they travelled inside the envelope


def encode(frame: Frame, seq: int) -> tuple[np.ndarray, bytes, bool]:
    """The envelope bytes, the header bytes when they must travel separately (else b""),
    and whether the tensors travel inside the envelope. Tensors must be contiguous."""
    if len(frame.tensors) > MAX_TENSORS:
        raise InvalidRequest(f"a frame carries at most {MAX_TENSORS} tensors, got {len(frame.tensors)}")
    if frame.step is not None:
        kind, header = KIND_STEP, step_codec.encode_header(frame.step)
    elif frame.result is not None:
        kind, header = KIND_RESULT, step_codec.encode_result(frame.result)
    else:
        kind, header = KIND_EMPTY, b""
    parts = []
    for t in frame.tensors:
        if t.dtype not in _CODE:
            raise InvalidRequest(f"the UCX data plane cannot carry {t.dtype} tensors")
        parts.append(_TENSOR.pack(_CODE[t.dtype], DEVICE_CUDA if t.is_cuda else DEVICE_CPU, t.dim()))
        parts.append(struct.pack(f"<{t.dim()}q", *t.shape))
    specs = b"".join(parts)
    overflow = _PREFIX.size + len(specs) + len(header) > ENVELOPE_BYTES
    if _PREFIX.size + len(specs) > ENVELOPE_BYTES:
        raise InvalidRequest("tensor shapes do not fit the frame envelope")
    data = b""
    nbytes = sum(t.numel() * t.element_size() for t in frame.tensors)
    inline = (not overflow and nbytes <= INLINE_BYTES and not any(t.is_cuda for t in frame.tensors)
              and _PREFIX.size + len(specs) + len(header) + nbytes <= ENVELOPE_BYTES)
    if inline:
        data = b"".join(wire_view(t).tobytes() for t in frame.tensors if t.numel())  # type: ignore[attr-defined]
    flags = (OVERFLOW if overflow else 0) | (INLINE if inline else 0)
    prefix = _PREFIX.pack(_MAGIC, kind, flags, len(frame.tensors), seq & 0xFFFFFFFF, len(header))
    body = prefix + specs + (b"" if overflow else header) + data
    return np.frombuffer(body, dtype=np.uint8), (header if overflow else b""), inline


def decode(buf: np.ndarray) -> Envelope:
    """Parse an envelope received into ``buf`` (a slot of at least ENVELOPE_BYTES)."""
    raw = buf.data
    magic, kind, flags, n, seq, header_len = _PREFIX.unpack_from(raw, 0)
    if magic != _MAGIC or kind not in (KIND_STEP, KIND_RESULT, KIND_EMPTY):
        raise ValueError("not a stagemesh frame envelope")
    off, specs = _PREFIX.size, []
    for _ in range(n):
        code, device, ndim = _TENSOR.unpack_from(raw, off)
        off += _TENSOR.size
        shape = struct.unpack_from(f"<{ndim}q", raw, off)
        off += 8 * ndim
        if code >= len(DTYPES) or any(d < 0 for d in shape):
            raise ValueError("corrupt tensor spec in frame envelope")
        specs.append(TensorSpec(DTYPES[code], tuple(shape), device == DEVICE_CUDA))
    overflow = bool(flags & OVERFLOW)
    header = b""
    if not overflow:
        if off + header_len > len(buf):
            raise ValueError("corrupt header length in frame envelope")
        header = bytes(raw[off:off + header_len])
        off += header_len
    inline = _inline_tensors(buf, off, specs) if flags & INLINE else None
    return Envelope(kind, seq, tuple(specs), header, header_len, overflow, inline)


def _inline_tensors(buf: np.ndarray, off: int, specs: list[TensorSpec]) -> list[torch.Tensor]:
    out = []
    for spec in specs:
        t = torch.empty(spec.shape, dtype=spec.dtype)
        if spec.nbytes:
            if off + spec.nbytes > len(buf):
                raise ValueError("corrupt inline tensor in frame envelope")
            dst = wire_view(t)
            dst.reshape(-1).view(np.uint8)[:] = buf[off:off + spec.nbytes]  # type: ignore[attr-defined]
            off += spec.nbytes
        out.append(t)
    return out


def to_frame(env: Envelope, header: bytes, tensors: list[torch.Tensor]) -> Frame:
    if env.kind == KIND_STEP:
        return Frame(step=step_codec.decode_header(header), tensors=tensors)
    if env.kind == KIND_RESULT:
        return Frame(result=step_codec.decode_result(header), tensors=tensors)
    return Frame(tensors=tensors)


def wire_view(t: torch.Tensor) -> object:
    """What UCX reads or writes for ``t``, sharing its memory: a numpy view of host memory,
    the tensor itself for CUDA memory (``__cuda_array_interface__``). bf16 has no numpy or
    CUDA-array-interface type, so it travels as int16 bits. ``t`` must be contiguous."""
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    if t.is_cuda:
        return raw
    if t.dtype == torch.bool:
        raw = t.view(torch.uint8)
    return raw.numpy()
