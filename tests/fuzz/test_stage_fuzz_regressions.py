"""Regressions the Stage API fuzzer found (tests/fuzz/test_grpc_stage_fuzz.py), each through the
real interface of a live stage: a Wire naming 100,000 stages blocked the stage's event loop for
minutes (a quadratic duplicate check) where it is refused at once; a KV transfer to an address
that is not ``host:port`` was INTERNAL ("Failed to create channel") where it is INVALID_ARGUMENT; a
frame whose tensor's shape disagrees with its bytes was UNKNOWN (a RuntimeError in reshape); a KV
transfer naming block 0 100,000 times read gigabytes and failed INTERNAL, where a transfer names
each block once."""

from __future__ import annotations

import grpc
import pytest

from stagekit.rpc.pb import common_pb2, stage_pb2
from stagekit.transport.grpc.control import HELLO, control_frame
from tests.fuzz.calls import status_of
from tests.helpers.stage_client import generate, stage_info, tokens_of, wire

SERVICE = "/stagemesh.v1.Stage/"


def test_a_wire_longer_than_the_model_is_refused_at_once(replica: list[str]) -> None:
    for stage, address in enumerate(replica):
        with grpc.insecure_channel(address) as channel:
            for pipeline in ([""] * 100_000, [f"127.0.0.1:{p}" for p in range(1, 30_001)]):
                code, details = status_of(channel, SERVICE + "Wire", stage_pb2.WireRequest(pipeline=pipeline,
                                          index=stage), timeout_s=20)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
                assert "each stage holds at least one layer" in details
        assert stage_info(address).wired  # left as it was
    assert tokens_of(generate(replica[0], [3, 200, 201], "after-wire", temperature=0.0, max_tokens=4)) != []


@pytest.mark.parametrize("destination", ["", ":::", "localhost:", "127.0.0.1:0", "127.0.0.1:99999", "a b:1"])
def test_kv_transfers_to_a_non_address_are_invalid_argument(replica: list[str], destination: str) -> None:
    with grpc.insecure_channel(replica[1]) as channel:
        code, details = status_of(channel, SERVICE + "SendKvBlocks", stage_pb2.SendKvBlocksRequest(
            destination=destination), timeout_s=20)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "is not a stage address (host:port)" in details, details
    prompt = list(range(100, 140))
    generate(replica[0], prompt, f"cache-{destination}", temperature=0.0, max_tokens=1)  # its KV is cached now
    with grpc.insecure_channel(replica[0]) as channel:
        code, details = status_of(channel, SERVICE + "ExportKv", stage_pb2.ExportKvRequest(
            token_ids=prompt, destination=[destination, replica[1]]), timeout_s=20)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "is not a stage address (host:port)" in details, details


@pytest.mark.parametrize("shape, data", [([], b"\x00" * 256), ([4, -4], b""), ([2**40], b""), ([3], b"\x00" * 8)])
def test_frames_whose_tensors_disagree_with_their_bytes_are_invalid_argument(replica: list[str], shape: list[int],
                                                                             data: bytes) -> None:
    frame = stage_pb2.Frame(tensors=[common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=shape, data=data)])
    with grpc.insecure_channel(replica[0]) as channel:
        # as the upstream stage would send it (hello first): the frame is refused and the stream with it
        code, details = status_of(channel, SERVICE + "PushFrames", [control_frame(HELLO), frame],
                                  request_streaming=True, timeout_s=20)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "tensor" in details, (code, details)
    wire(replica)  # that stream stood for the upstream link: the real upstream connects again
    assert tokens_of(generate(replica[0], [3, 200, 201], "after-frame", temperature=0.0, max_tokens=4)) != []


def test_a_stray_data_plane_stream_is_refused_and_leaves_the_link_up(replica: list[str]) -> None:
    """A PushFrames call that does not start with hello (not from the upstream stage): refused, and its
    end no longer marks the head's link from upstream lost (every request failed until a re-wire)."""
    before = tokens_of(generate(replica[0], [3, 200, 201], "before-stray", temperature=0.0, max_tokens=4))
    with grpc.insecure_channel(replica[0]) as channel:
        code, details = status_of(channel, SERVICE + "PushFrames", [stage_pb2.Frame()], request_streaming=True,
                                  timeout_s=20)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "must start with the upstream stage's hello" in details
    assert tokens_of(generate(replica[0], [3, 200, 201], "after-stray", temperature=0.0, max_tokens=4)) == before


def test_kv_transfers_naming_a_block_twice_are_invalid_argument(replica: list[str]) -> None:
    with grpc.insecure_channel(replica[1]) as channel:
        code, details = status_of(channel, SERVICE + "SendKvBlocks", stage_pb2.SendKvBlocksRequest(
            blocks=[0] * 100_000, destination_blocks=[0] * 100_000, destination=replica[0]), timeout_s=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "more than once" in details, (code, details)
        announce = stage_pb2.KvBlocksChunk(blocks=[1, 1], start_layer=2, end_layer=4, tp_size=1,
                                           dtype=common_pb2.DTYPE_FLOAT32)
        info = stage_info(replica[1])
        assert info.start_layer == 2
        code, details = status_of(channel, SERVICE + "PushKvBlocks", [announce], request_streaming=True,
                                  timeout_s=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
