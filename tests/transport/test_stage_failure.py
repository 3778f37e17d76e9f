"""A real pipeline on the UCX data plane loses its last stage: the replica head fails the
requests that needed it at once, with the reason, instead of waiting out its 120 s step
timeout (the transport turns the steps it originated into error results)."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from stagekit.rpc.pb import common_pb2, stage_pb2, stage_pb2_grpc
from stagemesh.launcher import Mesh, MeshSpec, split_layers
from tests.helpers.stage_client import generate, wire
from tests.transport.conftest import needs_ucx


def _stream(head: str, max_tokens: int) -> tuple[grpc.Channel, object]:
    ch = grpc.insecure_channel(head)
    req = stage_pb2.GenerateRequest(request_id="long", prompt_token_ids=[1, 17, 42],
                                    sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return ch, stage_pb2_grpc.StageStub(ch).Generate(req, timeout=60)


@needs_ucx
@pytest.mark.slow
def test_head_fails_requests_at_once_when_the_last_stage_dies(hf_checkpoints: dict, tmp_path) -> None:
    ref = hf_checkpoints["llama"]
    mesh = Mesh(MeshSpec(model=ref.path, layer_splits=split_layers(5, 2), tp=1, threads=1, gateway=False,
                         transport="ucx"), tmp_path)
    try:
        mesh.start(timeout_s=240)
        head = mesh.replicas[0][0]
        wire(mesh.replicas[0])
        assert generate(head, [5, 6, 7], max_tokens=4, ignore_eos=True)[-1].completion_tokens == 4
        ch, stream = _stream(head, max_tokens=240)
        next(iter(stream))                                   # tokens are flowing
        last = next(p for name, p in mesh.procs if name == "stage-r0-s1")
        os.killpg(last.pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(grpc.RpcError) as running:
            for _ in stream:
                pass
        ch.close()
        with pytest.raises(grpc.RpcError) as later:        # a request after the death
            generate(head, [9, 10], max_tokens=4)
        took = time.monotonic() - killed
    finally:
        mesh.stop()
    for err in (running.value, later.value):
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert "link" in err.details() and "exited" in err.details(), err.details()
    assert took < 10, f"the head took {took:.1f}s to fail requests after its last stage died"
