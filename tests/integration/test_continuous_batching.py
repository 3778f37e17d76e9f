"""Continuous batching against transformers: requests join a running TP1·PP2 replica at
different steps (each one once the previous has produced tokens), prompts are prefilled in
chunks of 8 tokens beside running decodes, and the KV pool (5 blocks) is too small for all
of them at once, so they wait for blocks and, depending on timing, are preempted and
recomputed (tests/integration/test_paged_kv.py forces preemption deterministically).
Every request still gets exactly transformers' greedy tokens."""

from __future__ import annotations

import threading

import grpc

from stagekit.rpc.pb import common_pb2, stage_pb2, stage_pb2_grpc
from stagemesh.launcher import Mesh, MeshSpec, split_layers
from tests.helpers.checkpoints import NUM_NEW, PROMPTS
from tests.helpers.stage_client import stage_info, wire

BLOCK_BYTES = 3 * 2 * 16 * 2 * 16 * 4  # the 3-layer stage: layers x K,V x tokens x KV heads x dims x fp32


def _stream(head: str, i: int, out: list[int], started: threading.Event) -> None:
    req = stage_pb2.GenerateRequest(request_id=f"join-{i}", prompt_token_ids=PROMPTS[i], sampling=common_pb2.
                                    SamplingParams(max_tokens=NUM_NEW, ignore_eos=True))
    with grpc.insecure_channel(head) as ch:
        for r in stage_pb2_grpc.StageStub(ch).Generate(req, timeout=120):
            out.extend(r.token_ids)
            if len(out) >= 3:
                started.set()
    started.set()


def test_requests_joining_at_different_steps_match_transformers(hf_checkpoints: dict, tmp_path) -> None:
    ref = hf_checkpoints["llama"]
    mesh = Mesh(MeshSpec(model=ref.path, layer_splits=split_layers(5, 2), threads=1, gateway=False,
                         kv_cache_memory=str(5 * BLOCK_BYTES), extra_stage_args=["--max-num-batched-tokens", "8"]),
                tmp_path)
    outs: list[list[int]] = [[] for _ in PROMPTS]
    try:
        mesh.start(timeout_s=240)
        head = mesh.replicas[0][0]
        wire(mesh.replicas[0])
        assert stage_info(head).kv_capacity_tokens == 5 * 16
        threads = []
        for i in range(len(PROMPTS)):
            started = threading.Event()
            t = threading.Thread(target=_stream, args=(head, i, outs[i], started))
            t.start()
            threads.append(t)
            assert started.wait(60), f"request {i} produced no tokens"
        for t in threads:
            t.join(120)
    finally:
        mesh.stop()
    for i, tokens in enumerate(outs):
        assert tokens == ref.tokens[i], f"prompt {i}"
