"""What a token pays outside the step that made it: a batch-1 stream read straight from the
replica head (Stage.Generate over gRPC) against the same stream through the gateway (REST,
server-sent events), on a mesh of one stage (``pp1``) and of two (``pp2``: the step also crosses
the data plane to the second stage and the sampled token comes back). Requests alternate
between the two paths so that load from other processes falls on both alike. A request's
figure is its time per token after the first, (last token - first token) / (tokens - 1):
a gRPC stream may carry two tokens in one message when the reader lags, and an SSE chunk
may carry no text, so per-gap medians would drop or merge gaps; the medians over requests
are compared."""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time

import grpc

from stagekit.config.model_config import ModelConfig
from stagekit.rpc.pb import common_pb2, stage_pb2, stage_pb2_grpc

_ids = itertools.count()


def direct_per_token(target: str, prompt: list[int], output_len: int) -> float:
    """Seconds per token after the first of one greedy Stage.Generate stream."""
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, top_p=1.0)
    req = stage_pb2.GenerateRequest(request_id=f"profile-{next(_ids)}", prompt_token_ids=prompt, sampling=sampling)
    stamps = []
    with grpc.insecure_channel(target) as channel:
        for resp in stage_pb2_grpc.StageStub(channel).Generate(req, timeout=600):
            stamps += [time.perf_counter()] * len(resp.token_ids)
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def measure_meshes(model: str, cfg: ModelConfig, meshes: list[str], threads: int, kv_cache_memory: str,
                   prompt_len: int = 128, output_len: int = 64, rounds: int = 4) -> list[dict]:
    from stagekit.ports import free_port
    from stagemesh.bench.load import run_load
    from stagemesh.launcher import MeshSpec, split_layers, start_mesh

    prompt = [random.Random(7).randrange(10, cfg.vocab_size) for _ in range(prompt_len)]
    out = []
    for name in meshes:
        pp = int(name.removeprefix("pp"))
        spec = MeshSpec(model=model, layer_splits=split_layers(cfg.num_layers, pp), threads=threads, port=free_port(),
                        kv_cache_memory=kv_cache_memory)
        mesh = start_mesh(spec, f"stagemesh-profile-{name}-")
        try:
            direct_per_token(mesh.replicas[0][0], prompt[:16], 4)  # warm-up, both paths
            asyncio.run(run_load(mesh.url, cfg.name, [prompt[:16]], 4))
            direct: list[float] = []
            gateway: list[float] = []
            for r in range(rounds):   # ABBA
                for path in (("direct", "gateway") if r % 2 == 0 else ("gateway", "direct")):
                    if path == "direct":
                        direct.append(direct_per_token(mesh.replicas[0][0], prompt, output_len))
                    else:
                        (t,) = asyncio.run(run_load(mesh.url, cfg.name, [prompt], output_len)).timings
                        gateway.append(sum(t.itl_s) / (t.num_tokens - 1))
        finally:
            mesh.stop()
        d, g = 1000 * statistics.median(direct), 1000 * statistics.median(gateway)
        out.append({"mesh": name, "direct_itl_ms": round(d, 3), "gateway_itl_ms": round(g, 3),
                    "gateway_adds_ms": round(g - d, 3), "requests": len(direct) + len(gateway)})
    return out
