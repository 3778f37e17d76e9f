"""Prefill/decode hand-offs between replicas of other layouts, on a tiny llama checkpoint: TP2
prefill to TP1 decode (the receiver re-splits the KV heads) over UCX and gRPC, and TP1 to TP1.
Each is token-exact against a colocated replica (greedy and seeded, prompts shorter than a
block and not a multiple of it) and the decode replica prefills only the tail. PP2 to PP2 is
tests/integration/test_pd_disaggregation.py (the default run's layout)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.roles import PdSettings
from stagekit.client import GenerationClient, RetryPolicy
from stagekit.tokenizer import Tokenizer
from stagemesh.launcher import Mesh, MeshSpec
from tests.gateway.harness import GatewayThread, wait_for
from tests.gateway.tokenizer_files import tokenizer_files
from tests.helpers.stage_client import generate, stage_info, tokens_of
from tests.transport.conftest import needs_ucx

pytestmark = pytest.mark.slow

# (prefill TP size, decode TP size, data plane)
LAYOUTS = [pytest.param((2, 1, "ucx"), id="tp2-tp1-ucx", marks=needs_ucx),
           pytest.param((2, 1, "grpc"), id="tp2-tp1-grpc"),
           pytest.param((1, 1, "grpc"), id="tp1-tp1-grpc")]


@dataclass
class Pair:
    prefill: str
    decode: str
    gw: GatewayThread


@pytest.fixture(scope="module", params=LAYOUTS)
def pair(request: pytest.FixtureRequest, hf_checkpoints: dict, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Pair]:
    tp_prefill, tp_decode, plane = request.param
    root = Path(tmp_path_factory.mktemp(f"pd-{tp_prefill}-{tp_decode}-{plane}"))
    meshes = [Mesh(MeshSpec(model=hf_checkpoints["llama"].path, layer_splits=[(0, 5)], tp=tp, threads=1,
                            gateway=False, transport=plane, kv_cache_memory="64MiB"), root / name)
              for name, tp in (("prefill", tp_prefill), ("decode", tp_decode))]
    gw = None
    try:
        for mesh in meshes:
            mesh.start(timeout_s=240)
        replicas = [mesh.replicas[0] for mesh in meshes]
        # the checkpoint has no tokenizer: the gateway's tests' own (prompts and outputs are token ids)
        gw = GatewayThread(replicas, roles=("prefill", "decode"), transport=plane, grpc_port=0, startup_timeout_s=60,
                           pd=PdSettings(min_prefill_tokens=0, lease_s=30),
                           tokenizer_factory=lambda files: Tokenizer.from_files(tokenizer_files()))
        gw.start(timeout_s=90)
        yield Pair(replicas[0][0], replicas[1][0], gw)
    finally:
        if gw is not None:
            gw.stop()
        for mesh in meshes:
            mesh.stop()


def _prompt(length: int, salt: int) -> list[int]:
    return [(11 * i + 3 * length + salt) % 250 + 3 for i in range(length)]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
@pytest.mark.parametrize("length", [7, 45])
def test_a_handoff_gives_the_colocated_tokens(pair: Pair, length: int, temperature: float) -> None:
    prompt, seed = _prompt(length, salt=int(temperature)), 300 + length
    hits = stage_info(pair.decode).prefix_hit_tokens
    with GenerationClient(pair.gw.grpc_target, timeout_s=120, retry=RetryPolicy(max_attempts=1)) as client:
        got = [t for c in client.generate(prompt, max_tokens=10, ignore_eos=True, seed=seed, temperature=temperature)
               for t in c.token_ids]
    assert stage_info(pair.decode).prefix_hit_tokens - hits == length // 16 * 16
    expected = tokens_of(generate(pair.prefill, prompt, request_id=f"ref-{seed}", max_tokens=10, ignore_eos=True,
                                  seed=seed, temperature=temperature))
    assert got == expected
    wait_for(lambda: all(stage_info(h).kv_blocks_referenced == 0 and stage_info(h).kv_holds == 0
                         for h in (pair.prefill, pair.decode)), 30, 0.1)
