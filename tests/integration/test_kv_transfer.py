"""KV transfer between two TP1·PP2 replicas of the same model (the seam of prefill/decode
disaggregation): replica A computes a prompt, exports its KV to replica B, and B then
serves the prompt without prefilling the transferred blocks and gives exactly the tokens
A gives. The stages' KV moves over UCX when both replicas run the UCX data plane and over
gRPC otherwise (both on gRPC, or A on UCX and B on gRPC). Bad transfers are refused with a
clear status; a receiving stage that dies mid-transfer fails the export with UNAVAILABLE
promptly, and the exporting replica keeps serving. All of it also between two replicas of a
Qwen2-MoE checkpoint (experts with a shared expert; the first stage holds a dense layer too)."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass

import grpc
import pytest

from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from stagemesh.launcher import Mesh, MeshSpec, split_layers
from tests.helpers.checkpoints import MOE_ARCHS
from tests.helpers.stage_client import generate, stage_info, tokens_of, wire
from tests.transport.conftest import needs_ucx

# (replica A's data plane, replica B's, the path the KV takes, the checkpoint)
PLANES = [pytest.param(("ucx", "ucx", "ucx", "llama"), id="ucx", marks=needs_ucx),
          pytest.param(("grpc", "grpc", "grpc", "llama"), id="grpc"),
          pytest.param(("ucx", "grpc", "grpc", "llama"), id="ucx-to-grpc", marks=needs_ucx),
          pytest.param(("grpc", "grpc", "grpc", "qwen2_moe"), id="grpc-qwen2_moe"),
          pytest.param(("ucx", "ucx", "ucx", "qwen2_moe"), id="ucx-qwen2_moe", marks=[needs_ucx, pytest.mark.slow])]
REPORT_S = 10.0


@dataclass
class Replicas:
    a: list[str]
    b: list[str]
    b_mesh: Mesh
    path: str   # the data path the KV should take


@pytest.fixture(scope="module", params=PLANES)
def replicas(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    plane_a, plane_b, path, arch = request.param
    checkpoints = request.getfixturevalue("moe_checkpoints" if arch in MOE_ARCHS else "hf_checkpoints")
    patch = pytest.MonkeyPatch()
    # several gRPC chunks per stage (12 KiB per block on the first stage: both models have 2 KV heads of 16 dims)
    patch.setenv("STAGEMESH_KV_CHUNK_BYTES", "16384")
    logs = tmp_path_factory.mktemp(f"kv-transfer-{plane_a}-{plane_b}-{arch}")
    meshes = [Mesh(MeshSpec(model=checkpoints[arch].path, layer_splits=split_layers(5, 2), threads=1,
                            gateway=False, transport=plane), logs / name)
              for name, plane in (("a", plane_a), ("b", plane_b))]
    try:
        for mesh in meshes:
            mesh.start(timeout_s=240)
            wire(mesh.replicas[0])
        yield Replicas(meshes[0].replicas[0], meshes[1].replicas[0], meshes[1], path)
    finally:
        for mesh in meshes:
            mesh.stop()
        patch.undo()


def _export(head: str, tokens: list[int], destination: list[str], timeout: float = 120) -> stage_pb2.ExportKvResponse:
    with grpc.insecure_channel(head) as ch:
        return stage_pb2_grpc.StageStub(ch).ExportKv(
            stage_pb2.ExportKvRequest(token_ids=tokens, destination=destination), timeout=timeout)


def _prompt(length: int, salt: int = 0) -> list[int]:
    return [(7 * i + length + salt) % 250 + 3 for i in range(length)]


@pytest.mark.parametrize("length", [40, 200])  # 2 blocks; 12 blocks (several gRPC chunks per stage)
def test_imported_kv_serves_the_prompt_with_the_exporters_tokens(replicas: Replicas, length: int) -> None:
    a, b = replicas.a, replicas.b
    prompt = _prompt(length)
    expected = tokens_of(generate(a[0], prompt, max_tokens=10, ignore_eos=True))  # A computed the prompt
    reply = _export(a[0], prompt, b)
    full = length // 16 * 16  # every full block of the prompt was named on A
    assert reply.num_tokens == full and reply.num_blocks_sent == full // 16 and reply.bytes_sent > 0
    assert reply.transport == replicas.path
    hits = stage_info(b[0]).prefix_hit_tokens
    got = tokens_of(generate(b[0], prompt, max_tokens=10, ignore_eos=True))
    assert got == expected
    # B prefilled only what was not transferred (at least one prompt token is always computed)
    assert stage_info(b[0]).prefix_hit_tokens - hits == min(full, (length - 1) // 16 * 16)
    again = _export(a[0], prompt, b)
    assert again.num_blocks_sent == 0 and again.transport == ""  # B holds them already


def test_bad_transfers_are_refused(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    prompt = list(range(3, 60))
    generate(a[0], prompt, max_tokens=2)
    with pytest.raises(grpc.RpcError) as err:
        _export(a[0], [200] * 40, b)  # never computed on A
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no cached KV" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _export(a[0], prompt, b[:1])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "same layers" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _export(a[0], prompt, [b[1], b[0]])  # stages out of order: layer ranges differ
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        _export(a[1], prompt, b)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "replica head" in err.value.details()
    assert generate(b[0], prompt, max_tokens=2)[-1].completion_tokens == 2  # B still serves


def test_a_receiving_stage_dying_mid_transfer_fails_the_export_promptly(replicas: Replicas) -> None:
    """B's second stage is frozen (SIGSTOP) while A exports, so A's second stage is left
    waiting on it mid-transfer, then killed: the export fails with UNAVAILABLE within
    REPORT_S, A keeps serving, and once the stage is replaced the transfer works again."""
    a, b = replicas.a, replicas.b
    warm = _prompt(40, salt=1)
    generate(a[0], warm, max_tokens=1)
    _export(a[0], warm, b)   # A's stages now know B's data planes: the next transfer goes straight to them
    prompt = _prompt(120, salt=2)
    expected = tokens_of(generate(a[0], prompt, max_tokens=6, ignore_eos=True))
    victim = next(p for name, p in replicas.b_mesh.procs if name == "stage-r0-s1" and p.poll() is None)
    os.killpg(victim.pid, signal.SIGSTOP)
    outcome: list[BaseException] = []

    def export() -> None:
        try:
            _export(a[0], prompt, b, timeout=60)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome.append(e)

    exporter = threading.Thread(target=export)
    exporter.start()
    time.sleep(1.5)        # A's second stage is now waiting on the frozen one
    assert exporter.is_alive(), f"the export ended while the receiver was frozen: {outcome}"
    os.killpg(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    exporter.join(timeout=60)
    took = time.monotonic() - killed
    assert not exporter.is_alive()
    assert outcome and isinstance(outcome[0], grpc.RpcError), outcome
    err = outcome[0]
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert b[1] in err.details(), err.details()
    if replicas.path == "ucx":   # the sender watches a receiver on this host by pid
        assert "exited" in err.details(), err.details()
    assert took < REPORT_S, f"the export took {took:.1f}s to fail after the receiver died"
    assert tokens_of(generate(a[0], prompt, max_tokens=6, ignore_eos=True)) == expected  # A keeps serving

    # replace the dead stage (same port): the reservation was released and the transfer works again
    victim.wait(timeout=10)
    replicas.b_mesh.procs.remove(("stage-r0-s1", victim))
    replicas.b_mesh.start_stage(0, 1, int(b[1].rsplit(":", 1)[1]))
    replicas.b_mesh.wait_stage(b[1], time.monotonic() + 120)
    wire(b)
    reply = _export(a[0], prompt, b)
    assert reply.num_blocks_sent == 120 // 16 and reply.transport == replicas.path
    assert tokens_of(generate(b[0], prompt, max_tokens=6, ignore_eos=True)) == expected


def test_a_destination_given_by_name_is_reached(replicas: Replicas) -> None:
    """ExportKv's destination may name the stages (a Kubernetes pod's DNS name): the exporter resolves the
    name when it dials (GetInfo, the push on either plane)."""
    a, named = replicas.a, [address.replace("127.0.0.1", "localhost") for address in replicas.b]
    assert named != replicas.b
    prompt = _prompt(40, salt=11)
    generate(a[0], prompt, max_tokens=2)
    reply = _export(a[0], prompt, named)
    assert reply.num_blocks_sent == 2 and reply.transport == replicas.path
