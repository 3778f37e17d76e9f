"""Found by the chaos soak (`stagemesh bench chaos`): a replica head that dies with requests in
flight leaves their KV block tables on the stages after it (no free ever reaches them). The head
restarted numbered its sequences from 1 again, so once its ids reached the dead head's, a surviving
stage appended the new sequence's blocks to the stale table and read and wrote KV in blocks that
now belonged to other sequences: greedy text changed, a few hundred requests after the restart.
Sequence ids are unique across a head's restarts now. Through the real Stage API: the same greedy
batch before the head is killed mid-stream and three times after it is back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from stagekit.demo import write_demo_model
from stagemesh.launcher import Mesh, MeshSpec
from tests.gateway.live import kill_stage, restart_stage
from tests.helpers.stage_client import generate, generate_many, tokens_of, wire

PROMPTS = [[3, 200 + i, 201, 202, 50 + i, 60, 70, 80, 90 + i, 100, 110, 120, 130, 140, 150, 160, 170 + i]
           for i in range(4)]


@pytest.fixture()
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    model = write_demo_model(tmp_path / "demo")
    # no prefix caching: blocks are handed out in order, so the new head's sequences land on the blocks the
    # stale tables name
    m = Mesh(MeshSpec(model=str(model), layer_splits=[(0, 2), (2, 4)], threads=1, gateway=False,
                      extra_stage_args=["--no-prefix-caching"]), tmp_path / "logs")
    try:
        m.start(timeout_s=180)
        wire(m.replicas[0])
        yield m
    finally:
        m.stop()


def batch(head: str) -> list[list[int]]:
    return [tokens_of(r) for r in generate_many(head, PROMPTS, temperature=0.0, max_tokens=60, ignore_eos=True)]


def test_a_restarted_head_gives_the_same_greedy_tokens(mesh: Mesh) -> None:
    head = mesh.replicas[0][0]
    reference = batch(head)
    errors: list[grpc.RpcError] = []

    def long_request(i: int) -> None:
        try:
            generate(head, [7, 8, 9 + i], f"long-{i}", temperature=0.0, max_tokens=1500, ignore_eos=True)
        except grpc.RpcError as e:
            errors.append(e)

    threads = [threading.Thread(target=long_request, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)  # the four are decoding: their tables are on the last stage
    kill_stage(mesh, 0, 0)
    for t in threads:
        t.join(timeout=60)
    assert len(errors) == 4
    restart_stage(mesh, 0, 0, timeout_s=120)
    wire(mesh.replicas[0])
    # one request first, so that the batches mix sequences under the dead head's ids (stale tables on the
    # last stage) with fresh ones the new head hands the same blocks (without the fix: the first two differ)
    generate(head, [5, 6], "one", temperature=0.0, max_tokens=2)
    for _ in range(3):
        assert batch(head) == reference
