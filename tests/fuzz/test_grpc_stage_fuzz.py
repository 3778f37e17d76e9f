"""Generated bad messages for a live stage's Stage API (tests/fuzz/proto_strategies.py): Wire with
odd pipelines and indices, Generate with odd ids, prompts and sampling values, Abort, the data
plane's PushFrames with odd step headers and tensors, and the KV-transfer calls (ExportKv,
ReserveKvBlocks, CommitKvBlocks, SendKvBlocks, PushKvBlocks) with odd blocks, shapes, dtypes and
destinations, each to the head and the last stage. Every answer is OK or a refusal with a message
(UNAVAILABLE too where a call dials an address it was given), never UNKNOWN/INTERNAL or a hang;
afterwards both stages are alive, the replica re-wired as it was serves the same greedy tokens as
before, and the gateway over it serves."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagekit.rpc.pb import stage_pb2
from tests.fuzz.calls import show, status_of
from tests.fuzz.conftest import EXAMPLES, REFUSALS, assert_gateway_serves
from tests.fuzz.proto_strategies import messages
from tests.gateway.harness import GatewayThread
from tests.helpers.stage_client import generate, stage_info, tokens_of, wire

SERVICE = "/stagemesh.v1.Stage/"
PROMPT = [3, 200, 201, 202, 50, 60]
# method: (request message, client-streaming, server-streaming, dials an address from the request)
METHODS = {
    "Wire": (stage_pb2.WireRequest, False, False, True),
    "Generate": (stage_pb2.GenerateRequest, False, True, False),
    "Abort": (stage_pb2.AbortRequest, False, False, False),
    "PushFrames": (stage_pb2.Frame, True, False, False),
    "ExportKv": (stage_pb2.ExportKvRequest, False, False, True),
    "ReserveKvBlocks": (stage_pb2.ReserveKvBlocksRequest, False, False, False),
    "CommitKvBlocks": (stage_pb2.CommitKvBlocksRequest, False, False, False),
    "SendKvBlocks": (stage_pb2.SendKvBlocksRequest, False, False, True),
    "PushKvBlocks": (stage_pb2.KvBlocksChunk, True, False, False),
}
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


def _hints(replica: list[str]) -> dict[str, list]:
    ids = [0, 1, 2, 3, 15, 16, 511, 512, 4096]
    return {"pipeline": [*replica, "127.0.0.1:1"], "destination": [*replica, "127.0.0.1:1"],
            "transport": ["", "grpc", "ucx", "tcp"], "request_id": ["fuzz", "", "fuzz-2"], "import_id": ["", "x"],
            "prompt_token_ids": ids, "token_ids": ids, "blocks": ids, "destination_blocks": ids,
            "new_blocks": ids, "seq_id": [0, 1, 2, -1], "seq_ids": [0, 1, 2], "step_id": [0, 1, 2**62],
            "shape": [0, 1, 2, 16, 64, -1, 2**40], "block_size": [16, 0, 15, -16],
            "data": [b"\x00" * 1024, b"\x01\x02"]}


@pytest.fixture(scope="module")
def reference(replica: list[str], gateway: GatewayThread) -> Iterator[list[int]]:
    """Greedy tokens of the calm replica; after the module: still alive, same tokens, gateway serving."""
    tokens = tokens_of(generate(replica[0], PROMPT, "before", temperature=0.0, max_tokens=8, ignore_eos=True))
    yield tokens
    for address in replica:
        assert stage_info(address).model_name  # alive
    wire(replica)  # the Wire fuzz may have re-pointed it (to real addresses: that is a Wire's job)
    after = generate(replica[0], PROMPT, "after", temperature=0.0, max_tokens=8, ignore_eos=True)
    assert tokens_of(after) == tokens
    assert_gateway_serves(gateway)


@pytest.mark.parametrize("method", list(METHODS))
def test_odd_stage_calls_are_answered_or_refused(replica: list[str], reference: list[int], method: str) -> None:
    message, client_streams, server_streams, dials = METHODS[method]
    allowed = REFUSALS | {grpc.StatusCode.OK} | ({grpc.StatusCode.UNAVAILABLE} if dials else set())
    one = messages(message.DESCRIPTOR, _hints(replica))
    request = st.lists(one, min_size=1, max_size=3) if client_streams else one
    channels = [grpc.insecure_channel(address) for address in replica]

    @FUZZ
    @given(request=request, stage=st.sampled_from(range(len(replica))))
    def fuzz(request, stage: int) -> None:
        code, details = status_of(channels[stage], SERVICE + method, request, request_streaming=client_streams,
                                  response_streaming=server_streams)
        what = f"{method} to stage {stage}: {show(request)}"
        assert code in allowed, f"{code.name} {details!r} for {what}"
        assert code == grpc.StatusCode.OK or details.strip(), f"{code.name} without a message for {what}"

    try:
        fuzz()
    finally:
        for ch in channels:
            ch.close()
