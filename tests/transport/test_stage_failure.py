"""A real pipeline loses a stage: the replica head fails the requests that needed it at
once, with the reason, instead of waiting out its 120 s step timeout, on both data planes
and whichever stage of the ring dies. The head hears of it directly when the dead stage is
its neighbour: a dead next stage breaks its outbound link, a dead last stage its inbound
one (on UCX a pidfd or the endpoint's error; on gRPC the stream failing or ending without a
goodbye), and the transport turns the steps the head originated into error results. In a
ring of four, a dead middle stage is no neighbour of the head: the stage after it loses its
link from upstream and sends a link-lost notice on to the head, which does the same."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import grpc
import pytest

from stagekit.rpc.pb import common_pb2, stage_pb2, stage_pb2_grpc
from stagemesh.launcher import Mesh, MeshSpec, split_layers
from tests.helpers.stage_client import generate, wire
from tests.transport.conftest import transport_params

PLANES = transport_params(["grpc", "ucx"])
REPORT_S = 10.0


def _stream(head: str, max_tokens: int) -> tuple[grpc.Channel, object]:
    ch = grpc.insecure_channel(head)
    req = stage_pb2.GenerateRequest(request_id="long", prompt_token_ids=[1, 17, 42],
                                    sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return ch, stage_pb2_grpc.StageStub(ch).Generate(req, timeout=60)


def _kill_stage_mid_request(ref_path: str, tmp_path: object, transport: str, pp: int, victim: int,
                            after: Callable[[Mesh], None] | None = None) -> tuple[list[grpc.RpcError], float]:
    """Start a TP1 mesh of ``pp`` stages, start a long request, SIGKILL stage ``victim``'s
    process group; the running request's error, a later request's error, and the seconds
    from the kill until both had failed. ``after`` then gets the mesh, before it stops."""
    mesh = Mesh(MeshSpec(model=ref_path, layer_splits=split_layers(5, pp), tp=1, threads=1, gateway=False,
                         transport=transport), tmp_path)
    try:
        mesh.start(timeout_s=240)
        head = mesh.replicas[0][0]
        wire(mesh.replicas[0])
        assert generate(head, [5, 6, 7], max_tokens=4, ignore_eos=True)[-1].completion_tokens == 4
        ch, stream = _stream(head, max_tokens=240)
        next(iter(stream))                                   # tokens are flowing
        proc = next(p for name, p in mesh.procs if name == f"stage-r0-s{victim}")
        os.killpg(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(grpc.RpcError) as running:
            for _ in stream:
                pass
        ch.close()
        with pytest.raises(grpc.RpcError) as later:        # a request after the death
            generate(head, [9, 10], max_tokens=4)
        took = time.monotonic() - killed
        if after is not None:
            after(mesh)
    finally:
        mesh.stop()
    return [running.value, later.value], took


def _check(errors: list[grpc.RpcError], took: float, transport: str) -> None:
    for err in errors:
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert "link" in err.details(), err.details()
        if transport == "ucx":   # the head's transport watches same-host neighbours by pid
            assert "exited" in err.details(), err.details()
    assert took < REPORT_S, f"the head took {took:.1f}s to fail requests after the stage died"


@pytest.mark.slow
@pytest.mark.parametrize("transport", PLANES)
def test_head_fails_requests_at_once_when_the_last_stage_dies(transport: str, hf_checkpoints: dict,
                                                               tmp_path) -> None:
    errors, took = _kill_stage_mid_request(hf_checkpoints["llama"].path, tmp_path, transport, pp=2, victim=1)
    _check(errors, took, transport)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 2], ids=["middle", "last"])
@pytest.mark.parametrize("transport", PLANES)
def test_head_fails_requests_at_once_when_a_stage_of_three_dies(transport: str, victim: int,
                                                                 hf_checkpoints: dict, tmp_path) -> None:
    errors, took = _kill_stage_mid_request(hf_checkpoints["llama"].path, tmp_path, transport, pp=3, victim=victim)
    _check(errors, took, transport)


@pytest.mark.slow
@pytest.mark.parametrize("transport", PLANES)
def test_head_fails_requests_at_once_when_a_stage_away_from_it_dies(transport: str, hf_checkpoints: dict,
                                                                     tmp_path) -> None:
    """head -> s1 -> s2 -> s3 -> head: s2 dies; s3 notices and tells the head, which serves
    again once the stage is replaced and the ring re-wired."""

    def replace_and_rewire(mesh: Mesh) -> None:
        proc = next(p for name, p in mesh.procs if name == "stage-r0-s2")
        proc.wait(timeout=10)
        mesh.procs.remove(("stage-r0-s2", proc))
        addr = mesh.replicas[0][2]
        mesh.start_stage(0, 2, int(addr.rsplit(":", 1)[1]))
        mesh.wait_stage(addr, time.monotonic() + 120)
        wire(mesh.replicas[0])
        assert generate(mesh.replicas[0][0], [5, 6, 7], max_tokens=4, ignore_eos=True)[-1].completion_tokens == 4

    errors, took = _kill_stage_mid_request(hf_checkpoints["llama"].path, tmp_path, transport, pp=4, victim=2,
                                           after=replace_and_rewire)
    _check(errors, took, transport)
    assert "ring is broken" in errors[0].details() and "ring is broken" in errors[1].details()


@pytest.mark.slow
@pytest.mark.parametrize("transport", PLANES)
def test_a_stalled_stage_fails_its_steps_after_the_step_timeout_and_the_mesh_recovers(
        transport: str, hf_checkpoints: dict, tmp_path) -> None:
    """A live stage that stops answering (SIGSTOP: no exit, no reset, nothing to notice)
    costs the requests in flight ``--step-timeout`` seconds, then they fail with the reason;
    once it runs again it works off what queued up, and the mesh serves exact tokens."""
    mesh = Mesh(MeshSpec(model=hf_checkpoints["llama"].path, layer_splits=split_layers(5, 2), tp=1, threads=1,
                         gateway=False, transport=transport, extra_stage_args=["--step-timeout", "3"]), tmp_path)
    try:
        mesh.start(timeout_s=240)
        head = mesh.replicas[0][0]
        wire(mesh.replicas[0])
        reference = [t for r in generate(head, [5, 6, 7], max_tokens=8, ignore_eos=True) for t in r.token_ids]
        ch, stream = _stream(head, max_tokens=240)
        next(iter(stream))                                   # tokens are flowing
        proc = next(p for name, p in mesh.procs if name == "stage-r0-s1")
        os.killpg(proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            with pytest.raises(grpc.RpcError) as running:
                for _ in stream:
                    pass
            took = time.monotonic() - stopped
        finally:
            ch.close()
            os.killpg(proc.pid, signal.SIGCONT)
        assert running.value.code() == grpc.StatusCode.UNAVAILABLE, running.value
        assert "within 3s" in running.value.details() and "stalled" in running.value.details()
        assert 2.5 < took < REPORT_S, f"the head failed the request {took:.1f}s after the stall"
        again = [t for r in generate(head, [5, 6, 7], max_tokens=8, ignore_eos=True) for t in r.token_ids]
        assert again == reference
    finally:
        mesh.stop()
