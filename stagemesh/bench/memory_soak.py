"""Resident memory of the stage processes over many requests (issue 5: no growth over a
1,000-request run). A TP1·PP2 mesh of the demo model, N requests with 8 in flight (prompts
of 20-59 tokens, 8-16 new tokens, prefix caching on, prompts sharing some prefixes), RSS
of every stage process after each 100 requests.

    stagemesh bench soak [--requests 1000] [--kv-cache-memory 64MiB] [--transport grpc]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from stagekit.demo import write_demo_model
from stagekit.rpc.pb import common_pb2, stage_pb2, stage_pb2_grpc
from stagemesh.bench.rss import tree_rss_mib
from stagemesh.launcher import Mesh, MeshSpec


def _wire(pipeline: list[str]) -> None:
    for i, addr in reversed(list(enumerate(pipeline))):
        with grpc.insecure_channel(addr) as ch:
            stage_pb2_grpc.StageStub(ch).Wire(stage_pb2.WireRequest(pipeline=pipeline, index=i), timeout=30)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--kv-cache-memory", default="64MiB")
    p.add_argument("--transport", default=None, help="ucx or grpc (default: the stages' default)")
    p.add_argument("--pp", type=int, default=2, choices=[1, 2])
    p.add_argument("--stage-args", default="", help="extra stage options, e.g. --no-prefix-caching")


def run(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="stagemesh-soak-"))
    model = write_demo_model(root / "demo")
    splits = [(0, 2), (2, 4)] if args.pp == 2 else [(0, 4)]
    mesh = Mesh(MeshSpec(model=str(model), layer_splits=splits, threads=1, gateway=False,
                         kv_cache_memory=args.kv_cache_memory, transport=args.transport,
                         extra_stage_args=args.stage_args.split()), root / "logs")
    rng = random.Random(0)
    shared = [[rng.randrange(10, 1000) for _ in range(32)] for _ in range(4)]

    def one(i: int) -> None:
        r = random.Random(i)
        prompt = (r.choice(shared)[: r.randrange(0, 33)] + [r.randrange(10, 1000) for _ in range(20)])[:59]
        req = stage_pb2.GenerateRequest(request_id=f"soak-{i}", prompt_token_ids=prompt, sampling=common_pb2.
                                        SamplingParams(max_tokens=r.randrange(8, 17), ignore_eos=True))
        with grpc.insecure_channel(head) as ch:
            list(stage_pb2_grpc.StageStub(ch).Generate(req, timeout=120))

    try:
        mesh.start(timeout_s=120)
        _wire(mesh.replicas[0])
        head = mesh.replicas[0][0]
        pids = [proc.pid for name, proc in mesh.procs if name.startswith("stage")]
        with ThreadPoolExecutor(8) as pool:
            for start in range(0, args.requests, 100):
                list(pool.map(one, range(start, min(args.requests, start + 100))))
                rss = " / ".join(f"{tree_rss_mib(pid):.0f}" for pid in pids)
                print(f"after {min(args.requests, start + 100)}: {rss} MiB", flush=True)
    finally:
        mesh.stop()
    return 0
