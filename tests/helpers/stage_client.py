"""Talk to a replica head over the real gRPC Stage API (what the gateway does)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc

from stagekit.rpc.pb import common_pb2, stage_pb2, stage_pb2_grpc


def wire(pipeline: list[str]) -> None:
    for i, addr in reversed(list(enumerate(pipeline))):
        with grpc.insecure_channel(addr) as ch:
            stage_pb2_grpc.StageStub(ch).Wire(stage_pb2.WireRequest(pipeline=pipeline, index=i), timeout=30)


def generate(head: str, prompt: list[int], request_id: str = "r", **sampling) -> list[stage_pb2.GenerateResponse]:
    with grpc.insecure_channel(head) as ch:
        req = stage_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                                        sampling=common_pb2.SamplingParams(**sampling))
        return list(stage_pb2_grpc.StageStub(ch).Generate(req, timeout=120))


def generate_many(head: str, prompts: list[list[int]], **sampling) -> list[list[stage_pb2.GenerateResponse]]:
    """Send all prompts at once so they share batches."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        futs = [pool.submit(generate, head, p, f"r{i}", **sampling) for i, p in enumerate(prompts)]
        return [f.result() for f in futs]


def tokens_of(responses: list[stage_pb2.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def stage_info(addr: str) -> stage_pb2.StageInfo:
    with grpc.insecure_channel(addr) as ch:
        return stage_pb2_grpc.StageStub(ch).GetInfo(stage_pb2.GetInfoRequest(), timeout=10)


@contextmanager
def demo_replica(root: Path) -> Iterator[list[str]]:
    """A wired two-stage replica (layers 0:2 | 2:4) of the tiny demo model under ``root``,
    stopped again (no process left) when the block ends; yields its stage addresses."""
    from stagekit.demo import write_demo_model
    from stagemesh.launcher import Mesh, MeshSpec

    model = write_demo_model(root / "demo")
    mesh = Mesh(MeshSpec(model=str(model), layer_splits=[(0, 2), (2, 4)], threads=1, gateway=False), root / "logs")
    try:
        mesh.start(timeout_s=120)
        wire(mesh.replicas[0])
        yield mesh.replicas[0]
    finally:
        mesh.stop()
