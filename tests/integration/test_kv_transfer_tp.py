"""KV transfer between TP2 stages: every rank's share of the blocks moves (rank r's KV heads
into rank r's pool), over UCX and over gRPC, and the importing replica then serves the
prompt with exactly the exporter's tokens without prefilling the transferred blocks; for
KV heads split over the ranks (llama, 2 KV heads) and replicated on them (qwen2, 1 KV head).
KV also moves between stages of different TP sizes (TP2 to TP1 and TP1 to TP2, over both
paths): the receiver re-splits the heads for its ranks."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
import torch

from stagekit.rpc import stage_proto
from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from stagemesh.launcher import Mesh, MeshSpec
from tests.helpers.stage_client import generate, stage_info, tokens_of, wire
from tests.transport.conftest import needs_ucx

pytestmark = needs_ucx


@dataclass
class Replicas:
    a: str          # TP2 on UCX: computes and exports
    dest: dict[str, str]   # TP2 importers by the path their KV takes: "ucx", "grpc"
    tp1: str        # a TP1 replica of the same model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def replicas(request: pytest.FixtureRequest, hf_checkpoints: dict, tmp_path_factory: pytest.TempPathFactory):
    arch = request.param
    logs = tmp_path_factory.mktemp(f"kv-transfer-tp-{arch}")
    layout = {"a": (2, "ucx"), "ucx": (2, "ucx"), "grpc": (2, "grpc"), "tp1": (1, "ucx")}
    meshes = {name: Mesh(MeshSpec(model=hf_checkpoints[arch].path, layer_splits=[(0, 5)], tp=tp, threads=1,
                                  gateway=False, transport=plane, kv_cache_memory="64MiB"), logs / name)
              for name, (tp, plane) in layout.items()}
    try:
        for mesh in meshes.values():
            mesh.start(timeout_s=240)
            wire(mesh.replicas[0])
        heads = {name: mesh.replicas[0][0] for name, mesh in meshes.items()}
        yield Replicas(heads["a"], {"ucx": heads["ucx"], "grpc": heads["grpc"]}, heads["tp1"])
    finally:
        for mesh in meshes.values():
            mesh.stop()


def _export(head: str, tokens: list[int], destination: str) -> stage_pb2.ExportKvResponse:
    with grpc.insecure_channel(head) as ch:
        return stage_pb2_grpc.StageStub(ch).ExportKv(
            stage_pb2.ExportKvRequest(token_ids=tokens, destination=[destination]), timeout=120)


def _prompt(length: int, salt: int) -> list[int]:
    return [(11 * i + 3 * length + salt) % 250 + 3 for i in range(length)]


@pytest.mark.parametrize("path", ["ucx", "grpc"])
def test_every_ranks_kv_moves_and_serves_the_exporters_tokens(replicas: Replicas, path: str) -> None:
    dest = replicas.dest[path]
    for length, salt in ((40, 0), (200, 1 if path == "ucx" else 2)):
        prompt = _prompt(length, salt)
        expected = tokens_of(generate(replicas.a, prompt, max_tokens=10, ignore_eos=True))
        reply = _export(replicas.a, prompt, dest)
        full = length // 16 * 16
        assert (reply.num_tokens, reply.num_blocks_sent, reply.transport) == (full, full // 16, path)
        hits = stage_info(dest).prefix_hit_tokens
        assert tokens_of(generate(dest, prompt, max_tokens=10, ignore_eos=True)) == expected
        assert stage_info(dest).prefix_hit_tokens - hits == min(full, (length - 1) // 16 * 16)


@pytest.mark.parametrize("direction", ["tp2->tp1", "tp1->tp2", "tp1->tp2 grpc"])
def test_kv_moves_between_different_tp_sizes(replicas: Replicas, direction: str) -> None:
    """The receiving stage re-splits the KV heads for its ranks (split heads for llama,
    replicated for qwen2) and serves the exporter's tokens from the transferred blocks."""
    src, dest, path = {"tp2->tp1": (replicas.a, replicas.tp1, "ucx"),
                       "tp1->tp2": (replicas.tp1, replicas.dest["ucx"], "ucx"),
                       "tp1->tp2 grpc": (replicas.tp1, replicas.dest["grpc"], "grpc")}[direction]
    salt = {"tp2->tp1": 5, "tp1->tp2": 6, "tp1->tp2 grpc": 7}[direction]
    prompt = _prompt(72, salt)   # computed on the source only: the destination lacks its blocks
    expected = tokens_of(generate(src, prompt, max_tokens=10, ignore_eos=True))
    reply = _export(src, prompt, dest)
    assert (reply.num_tokens, reply.num_blocks_sent, reply.transport) == (64, 4, path)
    hits = stage_info(dest).prefix_hit_tokens
    assert tokens_of(generate(dest, prompt, max_tokens=10, ignore_eos=True)) == expected
    assert stage_info(dest).prefix_hit_tokens - hits == 64


def _push(stage: str, head: stage_pb2.KvBlocksChunk) -> None:
    with grpc.insecure_channel(stage) as ch:
        stage_pb2_grpc.StageStub(ch).PushKvBlocks(iter([head]), timeout=30)


def test_ill_fitting_kv_announcements_are_refused(replicas: Replicas) -> None:
    """An announcement whose shape is not what a stage of its TP size sends, or whose TP size
    cannot hold the model's KV heads, is INVALID_ARGUMENT; the stage keeps serving."""
    dest = replicas.dest["grpc"]
    tp1_shape = [5, 2, 1, 2, 16, 8]   # a TP1 stage's layout (for any head count: the shape is wrong for TP2)
    f32 = stage_proto.dtype_to_proto(torch.float32)
    with pytest.raises(grpc.RpcError) as err:
        _push(dest, stage_pb2.KvBlocksChunk(blocks=[0], start_layer=0, end_layer=5, tp_size=2, dtype=f32,
                                            shape=tp1_shape))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not fit" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _push(dest, stage_pb2.KvBlocksChunk(blocks=[0], start_layer=0, end_layer=5, tp_size=5, dtype=f32,
                                            shape=tp1_shape))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not fit" in err.value.details() or "cannot hold" in err.value.details()
    assert generate(dest, _prompt(20, 9), max_tokens=2)[-1].completion_tokens == 2
