"""KV transfer between two TP1·PP2 replicas of the same model (the seam of prefill/decode
disaggregation): replica A computes a prompt, exports its KV to replica B, and B then
serves the prompt without prefilling the transferred blocks and gives exactly the tokens
A gives. Bad transfers are refused with a clear status."""

from __future__ import annotations

import grpc
import pytest

from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from stagemesh.launcher import Mesh, MeshSpec, split_layers
from tests.helpers.stage_client import generate, stage_info, tokens_of, wire


@pytest.fixture(scope="module")
def replicas(hf_checkpoints: dict, tmp_path_factory: pytest.TempPathFactory):
    ref = hf_checkpoints["llama"]
    patch = pytest.MonkeyPatch()
    patch.setenv("STAGEMESH_KV_CHUNK_BYTES", "16384")  # several chunks per stage (12 KiB per block)
    mesh = Mesh(MeshSpec(model=ref.path, layer_splits=split_layers(5, 2), dp=2, threads=1, gateway=False),
                tmp_path_factory.mktemp("kv-transfer"))
    try:
        mesh.start(timeout_s=240)
        for rep in mesh.replicas:
            wire(rep)
        yield mesh.replicas
    finally:
        mesh.stop()
        patch.undo()


def _export(head: str, tokens: list[int], destination: list[str]) -> stage_pb2.ExportKvResponse:
    with grpc.insecure_channel(head) as ch:
        return stage_pb2_grpc.StageStub(ch).ExportKv(
            stage_pb2.ExportKvRequest(token_ids=tokens, destination=destination), timeout=120)


@pytest.mark.parametrize("length", [40, 200])  # 2 blocks; 12 blocks (several chunks per stage)
def test_imported_kv_serves_the_prompt_with_the_exporters_tokens(replicas, length: int) -> None:
    a, b = replicas
    prompt = [(7 * i + length) % 250 + 3 for i in range(length)]
    expected = tokens_of(generate(a[0], prompt, max_tokens=10, ignore_eos=True))  # A computed the prompt
    reply = _export(a[0], prompt, b)
    full = length // 16 * 16  # every full block of the prompt was named on A
    assert reply.num_tokens == full and reply.num_blocks_sent == full // 16 and reply.bytes_sent > 0
    hits = stage_info(b[0]).prefix_hit_tokens
    got = tokens_of(generate(b[0], prompt, max_tokens=10, ignore_eos=True))
    assert got == expected
    # B prefilled only what was not transferred (at least one prompt token is always computed)
    assert stage_info(b[0]).prefix_hit_tokens - hits == min(full, (length - 1) // 16 * 16)
    assert _export(a[0], prompt, b).num_blocks_sent == 0  # B holds them already


def test_bad_transfers_are_refused(replicas) -> None:
    a, b = replicas
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
