"""A KV transfer whose sender stalls mid-transfer past the reservation's lease and then
resumes never writes into the blocks it was given, which by then serve another request
(ARCHITECTURE, "KV transfer": the land-by time and the quarantine). Real stage, UCX: the
sender (a process of its own) opens a bulk transfer into reserved blocks of nearly the
whole pool, gets the stage's OK, and stalls; the reservation lapses, its blocks come back
and a prompt is prefilled into them; then the sender sends its bytes. The prompt, served
again from those cached blocks, gives the same greedy tokens as before, and the stage
keeps serving."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from stagekit.config.model_config import load_model_config
from stagekit.demo import write_demo_model
from stagekit.parallel.kv_heads import transfer_shape
from stagekit.ports import free_port
from stagekit.rpc import stage_proto
from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from stagemesh.launcher import Mesh, MeshSpec
from tests.gateway.harness import wait_for
from tests.helpers.stage_client import generate, stage_info, tokens_of
from tests.transport.conftest import needs_ucx

pytestmark = needs_ucx
LEASE_MS = 3000   # the sender's hello comes well within it, even on a loaded machine


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = Path(tmp_path_factory.mktemp("kv-late"))
    model = write_demo_model(root / "demo")   # 16 KiB of KV per block: a pool of 64 blocks
    mesh = Mesh(MeshSpec(model=str(model), layer_splits=[(0, 4)], threads=1, port=free_port(), gateway=False,
                         transport="ucx", kv_cache_memory="1MiB"), root / "logs")
    try:
        mesh.start(timeout_s=180)
        yield mesh.replicas[0][0], model
    finally:
        mesh.stop()


def _reserve_most(stub: stage_pb2_grpc.StageStub, num_blocks: int) -> stage_pb2.ReserveKvBlocksResponse:
    """A reservation of as many blocks as the head grants (all free but its headroom)."""
    for n in range(num_blocks, 0, -1):
        try:
            return stub.ReserveKvBlocks(stage_pb2.ReserveKvBlocksRequest(
                hashes=[10**9 + i for i in range(n)], block_size=16, lease_ms=LEASE_MS), timeout=10)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
    raise AssertionError("no block could be reserved")


def test_a_stalled_senders_late_bytes_never_land_in_reused_blocks(stage: tuple[str, Path]) -> None:
    head, model = stage
    info = stage_info(head)
    num_blocks = info.kv_capacity_tokens // info.kv_block_size
    prompt = [(11 * i + 5) % 1000 + 3 for i in range(num_blocks * 16 * 5 // 8)]   # 5/8 of the pool
    sender = subprocess.Popen([sys.executable, "-m", "tests.helpers.stalled_kv_sender", info.transport_address.hex()],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert sender.stdout is not None and sender.stdin is not None
        assert sender.stdout.readline().strip() == "ready"
        with grpc.insecure_channel(head) as ch:
            reply = _reserve_most(stage_pb2_grpc.StageStub(ch), num_blocks)
        assert len(reply.blocks) > num_blocks - len(prompt) // 16   # the prompt must take some of them
        cfg = load_model_config(str(model))
        shape = transfer_shape(1, cfg.num_kv_heads, cfg.num_layers, len(reply.blocks), 16, cfg.head_dim)
        header = stage_pb2.KvBlocksChunk(blocks=reply.blocks, start_layer=0, end_layer=cfg.num_layers, tp_size=1,
                                         dtype=stage_proto.dtype_to_proto(cfg.torch_dtype()), shape=list(shape),
                                         land_by_unix_ms=reply.land_by_unix_ms)
        nbytes = math.prod(shape) * cfg.torch_dtype().itemsize
        sender.stdin.write(f"{header.SerializeToString().hex()} {nbytes}\n")
        sender.stdin.flush()
        assert sender.stdout.readline().strip() == "verdict"   # the stage's receive is posted; the sender stalls
        wait_for(lambda: stage_info(head).kv_blocks_referenced == 0, 30, 0.1)   # the reservation's blocks are back
        assert time.time() * 1000 > reply.land_by_unix_ms
        expected = tokens_of(generate(head, prompt, max_tokens=8, ignore_eos=True))   # prefilled into them
        hits = stage_info(head).prefix_hit_tokens
        sender.stdin.write("go\n")   # the sender resumes: its bytes go out now
        sender.stdin.flush()
        done = sender.stdout.readline().strip()
        assert done.startswith("done DeadlineExceeded"), done   # the stage gave up at the land-by time
        assert sender.stdout.readline().strip() == "sent"
        assert sender.wait(timeout=30) == 0
        again = tokens_of(generate(head, prompt, max_tokens=8, ignore_eos=True))
        assert stage_info(head).prefix_hit_tokens - hits >= len(prompt) // 16 * 16 - 16   # from the cached blocks
        assert again == expected
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(timeout=10)
    assert tokens_of(generate(head, list(range(3, 50)), max_tokens=4)) != []   # still serving
