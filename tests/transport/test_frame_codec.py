"""The UCX data plane's pieces that need no peer: the frame envelope, the wire formats,
the tag scheme, the bookkeeping of steps a stage originated, and the settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stagekit.errors import ConfigError, InvalidRequest
from stagekit.transport import frame_codec
from stagekit.transport.origin_steps import OriginSteps
from stagekit.transport.recv_pool import RecvPool
from stagekit.transport.ucx import wire
from stagekit.transport.ucx.settings import UcxSettings
from stagekit.types.step import Frame, SeqSlice, StepHeader, StepResult


def _slot(envelope: np.ndarray) -> np.ndarray:
    slot = np.full(frame_codec.ENVELOPE_BYTES, 0xAB, dtype=np.uint8)  # a reused slot holds stale bytes
    slot[:len(envelope)] = envelope
    return slot


def test_envelope_carries_header_specs_and_small_tensors_inline() -> None:
    tensors = [torch.randn(2, 3).to(torch.bfloat16), torch.tensor([True, False]), torch.empty(0, 5)]
    frame = Frame(step=StepHeader(42, [SeqSlice(1, 2, 3, True)], freed_seq_ids=[7]), tensors=tensors)
    envelope, header, inline = frame_codec.encode(frame, seq=9)
    assert header == b"" and inline
    env = frame_codec.decode(_slot(envelope))
    assert env.seq == 9 and not env.overflow
    assert [(s.dtype, s.shape) for s in env.specs] == [(t.dtype, tuple(t.shape)) for t in tensors]
    got = frame_codec.to_frame(env, env.header, env.inline)
    assert got.step.step_id == 42 and got.step.seqs == frame.step.seqs and got.step.freed_seq_ids == [7]
    for a, b in zip(tensors, got.tensors, strict=True):
        assert torch.equal(a, b)


def test_large_tensors_travel_apart_and_large_headers_overflow() -> None:
    big = torch.zeros(frame_codec.INLINE_BYTES)          # 4x the inline budget in fp32
    env = frame_codec.decode(_slot(frame_codec.encode(Frame(result=StepResult(1, [], [], [])), 0)[0]))
    assert env.kind == frame_codec.KIND_RESULT and env.inline == []
    envelope, header, inline = frame_codec.encode(Frame(step=StepHeader(1, []), tensors=[big]), 1)
    assert not inline and frame_codec.decode(_slot(envelope)).inline is None
    huge = Frame(step=StepHeader(2, [SeqSlice(i, i, 1, True) for i in range(5000)]))
    envelope, header, inline = frame_codec.encode(huge, 2)
    env = frame_codec.decode(_slot(envelope))
    assert env.overflow and len(header) == env.header_len > frame_codec.ENVELOPE_BYTES
    assert frame_codec.to_frame(env, header, []).step.seqs == huge.step.seqs


def test_corrupt_envelopes_are_rejected() -> None:
    with pytest.raises(ValueError):
        frame_codec.decode(np.zeros(frame_codec.ENVELOPE_BYTES, dtype=np.uint8))
    with pytest.raises(InvalidRequest):
        frame_codec.encode(Frame(tensors=[torch.zeros(2, dtype=torch.complex64)]), 0)


def test_tags_keep_links_frames_and_parts_apart() -> None:
    tags = {wire.frame_tag(link, seq, part) for link in (1, 2) for seq in (0, 1, 2**24 - 1) for part in (0, 1, 2)}
    assert len(tags) == 18 and all(t >> 63 == 0 for t in tags)
    assert wire.frame_tag(5, 2**24, 0) == wire.frame_tag(5, 0, 0)  # seq wraps
    control = {wire.hello_tag(7), wire.welcome_tag(7)}
    assert len(control) == 2 and all(t >> 63 == 1 for t in control)


def test_address_and_hello_round_trip() -> None:
    me = wire.PeerAddress(b"\x01\x02worker", inbox=0xDEADBEEF, pid=1234, host="node-7")
    assert wire.PeerAddress.unpack(me.pack()) == me
    hello = wire.Hello(99, me, error_handling=True)
    got = wire.Hello.unpack(hello.pack() + b"\0" * 100)   # read from a larger slot
    assert got.link_id == 99 and got.error_handling and got.sender.worker_address == me.worker_address
    assert wire.unpack_welcome(wire.pack_welcome(wire.WELCOME_OK)) == wire.WELCOME_OK
    with pytest.raises(ValueError):
        wire.PeerAddress.unpack(b"grpc")


def test_origin_steps_tracks_only_steps_started_here() -> None:
    o = OriginSteps()
    head_step = Frame(step=StepHeader(1, []))
    o.sent(head_step)                                 # the head's own step: open until its result
    relayed = Frame(step=StepHeader(2, []))
    o.received(relayed)
    assert not o.originates(relayed)
    o.sent(relayed)                                   # passing through: not ours
    o.sent(Frame(result=StepResult(3, [], [], [])))   # a last stage's result: not a step
    assert list(o.open) == [1]
    o.sent(Frame(step=StepHeader(4, [])))
    o.received(Frame(result=StepResult(1, [], [], [])))
    failed = o.fail_all("link lost")
    assert [(f.result.step_id, f.result.error) for f in failed] == [(4, "link lost")] and not o.open


def test_settings_profiles_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    auto = UcxSettings.from_env()
    assert auto.profile == "auto" and auto.link_error_handling(True) is False and auto.link_error_handling(False)
    assert UcxSettings.from_env("tcp").link_error_handling(True) is True
    monkeypatch.setenv("STAGEMESH_UCX_PROFILE", "cma")
    monkeypatch.setenv("STAGEMESH_UCX_SPIN_US", "50")
    monkeypatch.setenv("STAGEMESH_UCX_PROGRESS", "polling")
    s = UcxSettings.from_env()
    assert (s.tls, s.error_handling, s.spin_us, s.spin_s) == ("posix,cma", False, 50.0, float("inf"))
    with pytest.raises(ConfigError, match="unknown UCX profile 'rdma'"):
        UcxSettings.from_env("rdma")
    monkeypatch.setenv("STAGEMESH_UCX_PROGRESS", "thread")
    with pytest.raises(ConfigError, match="unknown UCX progress mode .thread."):
        UcxSettings.from_env()


def test_receive_pool_reuses_memory_only_once_nothing_holds_it() -> None:
    pool = RecvPool()
    a = pool.empty((512, 1024), torch.float32)                 # 2 MiB: pooled
    ptr = a.data_ptr()
    view, arr = a[3:], a.numpy()
    del a
    b = pool.empty((512, 1024), torch.float32)
    assert b.data_ptr() != ptr                                  # a view and a numpy array still hold it
    del view, arr, b
    c = pool.empty((1024, 1024), torch.bfloat16)                # same bytes, another dtype and shape
    assert c.data_ptr() == ptr and c.shape == (1024, 1024) and c.dtype == torch.bfloat16 and c.is_contiguous()
    assert pool.reused == 1 and pool.allocated == 2
    small = pool.empty((3, 5), torch.float16)
    assert pool.allocated == 2 and small.shape == (3, 5)       # small tensors bypass the pool
