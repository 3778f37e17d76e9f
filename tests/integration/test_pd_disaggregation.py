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

import asyncio
import os
import re
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.roles import PdSettings
from stagekit.client import GenerationClient, RetryPolicy
from stagekit.config.model_config import load_model_config
from stagekit.demo import write_demo_model
from stagekit.errors import StagemeshError
from stagekit.ports import free_port
from stagemesh.launcher import Mesh, MeshSpec
from tests.gateway.harness import GatewayThread, wait_for
from tests.gateway.live import kill_stage, restart_stage
from tests.helpers.stage_client import generate, stage_info, tokens_of
from tests.transport.conftest import needs_ucx, ucx_importable

LEASE_S = 5.0
MIN_PREFILL = 4
PLANES = [pytest.param("ucx", marks=needs_ucx), pytest.param("grpc")]
# the faults run on one data plane (UCX where it imports, its shared-memory path being the one
# whose failure detection differs); the token-exact tests run on both
FAULT_PLANE = "ucx" if ucx_importable() else "grpc"


@dataclass
class Pair:
    plane: str
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
        yield Pair(request.param, mesh, prefill, decode, gw)
    finally:
        if gw is not None:
            gw.stop()
        mesh.stop()


def _prompt(length: int, salt: int) -> list[int]:
    return [(13 * i + 7 * length + salt) % 240 + 5 for i in range(length)]


def _colocated(p: Pair, prompt: list[int], seed: int, **sampling: object) -> list[int]:
    """What one replica gives for the whole request (the prefill replica, asked directly)."""
    sampling.setdefault("temperature", 0.0)
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
    sampling.setdefault("temperature", 0.0)
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
        assert _metric(pair, "stagemesh_pd_transfer_bytes_total") > 0
        assert _metric(pair, "stagemesh_pd_transfer_seconds_count") >= 1
    # TTFT and ITL by the role of the replica that produced the token (the gap between the two: handoff)
    assert _metric(pair, "stagemesh_pd_time_to_first_token_seconds_count", role="prefill") >= 1
    for role in ("handoff", "decode"):
        assert _metric(pair, "stagemesh_pd_inter_token_latency_seconds_count", role=role) >= 1
    assert got == _colocated(pair, prompt, seed, **params)
    _settled(pair)


def test_a_prompt_the_decode_replica_caches_goes_straight_to_it(pair: Pair) -> None:
    prompt = _prompt(48, salt=9)
    _disaggregated(pair, prompt, 7)   # a hand-off: the decode replica now caches the prompt's blocks
    longer = prompt + [11, 12, 13]    # that prompt and a tail of 3 tokens (<= MIN_PREFILL)
    seen = stage_info(pair.prefill[0]).prefix_query_tokens
    direct = _metric(pair, "stagemesh_pd_handoffs_total", outcome="direct")
    got = _disaggregated(pair, longer, 8)
    assert stage_info(pair.prefill[0]).prefix_query_tokens == seen   # the prefill replica saw nothing
    assert _metric(pair, "stagemesh_pd_handoffs_total", outcome="direct") == direct + 1
    assert got == _colocated(pair, longer, 8)


def test_a_request_of_one_token_ends_on_the_prefill_replica(pair: Pair) -> None:
    prompt = _prompt(40, salt=31)
    seen = stage_info(pair.decode[0]).prefix_query_tokens
    ended = _metric(pair, "stagemesh_pd_handoffs_total", outcome="prefill_only")
    with GenerationClient(pair.gw.grpc_target, timeout_s=120, retry=RetryPolicy(max_attempts=1)) as client:
        got = [t for c in client.generate(prompt, max_tokens=1, temperature=0.0) for t in c.token_ids]
    assert stage_info(pair.decode[0]).prefix_query_tokens == seen   # the decode replica saw nothing
    assert _referenced(pair.prefill[0]) == (0, 0)   # and the prefill replica holds nothing for it
    assert _metric(pair, "stagemesh_pd_handoffs_total", outcome="prefill_only") == ended + 1
    assert got == tokens_of(generate(pair.prefill[0], prompt, request_id="ref-one", max_tokens=1))


# --- faults in the middle of a transfer ---------------------------------------------------------


def _proc(p: Pair, replica: int, stage: int) -> int:
    return next(proc.pid for name, proc in p.mesh.procs if name == f"stage-r{replica}-s{stage}" and proc.poll() is None)


def _signal(p: Pair, replica: int, stage: int, sig: int) -> None:
    os.killpg(_proc(p, replica, stage), sig)


@contextmanager
def _at_handoff(p: Pair, before: Callable[[], None], during: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Around the next hand-off's export (the gateway's call to the prefill head): ``before`` it
    starts, then ``during`` it, each on a thread so that the gateway's loop keeps running."""
    replica = p.gw.state.pool.replicas[0]
    original = replica.export_kv

    async def export_kv(*args: object, **kwargs: object) -> object:
        await asyncio.to_thread(before)
        call = asyncio.ensure_future(original(*args, **kwargs))
        await asyncio.to_thread(during)
        return await call

    replica.export_kv = export_kv
    try:
        yield
    finally:
        del replica.export_kv


def _reserved_on_decode(p: Pair) -> None:
    """Wait until the decode head reserved the hand-off's blocks: the transfer is under way."""
    wait_for(lambda: _referenced(p.decode[0])[0] > 0, 30, 0.02)


def _serving_again(p: Pair, replica: int) -> None:
    for stage in range(2):
        if not any(name == f"stage-r{replica}-s{stage}" and proc.poll() is None for name, proc in p.mesh.procs):
            restart_stage(p.mesh, replica, stage)
    wait_for(lambda: p.gw.state.pool.replicas[replica].serving, 60, 0.1)
    prompt = _prompt(40, salt=100 + replica)
    moved = _metric(p, "stagemesh_pd_handoffs_total", outcome="transferred")
    assert _disaggregated(p, prompt, 5) == _colocated(p, prompt, 5)
    assert _metric(p, "stagemesh_pd_handoffs_total", outcome="transferred") == moved + 1


def _fault_plane(p: Pair) -> None:
    if p.plane != FAULT_PLANE:
        pytest.skip(f"the faults run on one data plane per run ({FAULT_PLANE} here)")


def test_prefill_killed_mid_transfer_decode_prefills_itself(pair: Pair) -> None:
    """The prefill replica's second stage is frozen, so the export waits on it with the decode
    head's blocks reserved; then the prefill replica is killed. The decode replica prefills the
    prompt itself (counted), the client gets the colocated tokens, the reservation lapses."""
    _fault_plane(pair)
    prompt, seed = _prompt(64, salt=21), 21
    expected = _colocated(pair, prompt, seed)
    failed = _metric(pair, "stagemesh_pd_fallbacks_total", reason="transfer_failed")

    def kill_prefill() -> None:
        _reserved_on_decode(pair)
        kill_stage(pair.mesh, 0, 0)
        kill_stage(pair.mesh, 0, 1)

    with _at_handoff(pair, lambda: _signal(pair, 0, 1, signal.SIGSTOP), kill_prefill):
        assert _disaggregated(pair, prompt, seed) == expected
    assert _metric(pair, "stagemesh_pd_fallbacks_total", reason="transfer_failed") == failed + 1
    wait_for(lambda: _referenced(pair.decode[0]) == (0, 0), 3 * LEASE_S, 0.1)   # the reservation lapsed
    _serving_again(pair, 0)
    _settled(pair)


def test_decode_killed_mid_transfer_fails_clearly_and_frees_the_prefill_blocks(pair: Pair) -> None:
    """The decode replica's second stage is frozen mid-transfer, then the decode replica is
    killed: with no other decode replica the request fails with a clear error; the prefill
    replica's held and pinned blocks are freed; both serve once the decode replica is back."""
    _fault_plane(pair)
    prompt = _prompt(64, salt=22)

    def kill_decode() -> None:
        _reserved_on_decode(pair)
        kill_stage(pair.mesh, 1, 0)
        kill_stage(pair.mesh, 1, 1)

    with _at_handoff(pair, lambda: _signal(pair, 1, 1, signal.SIGSTOP), kill_decode):
        with pytest.raises(StagemeshError, match="decode replica 1 failed during the hand-off"):
            _disaggregated(pair, prompt, 22)
    assert _metric(pair, "stagemesh_pd_fallbacks_total", reason="decode_down") >= 1
    wait_for(lambda: _referenced(pair.prefill[0]) == (0, 0), 3 * LEASE_S, 0.1)
    _serving_again(pair, 1)
    _settled(pair)


def test_a_stalled_decode_stage_ends_the_handoff_at_its_lease(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    """A decode stage frozen (SIGSTOP) for good: the export ends at its lease, the reservation
    and the prefill replica's blocks are released, the request fails with a clear error, and
    once the stage runs again both replicas serve."""
    _fault_plane(pair)
    prompt = _prompt(64, salt=23)
    try:
        with _at_handoff(pair, lambda: _signal(pair, 1, 1, signal.SIGSTOP)):
            with pytest.raises(StagemeshError, match="decode replica 1 failed during the hand-off"):
                _disaggregated(pair, prompt, 23)
        assert "within its lease" in caplog.text   # the gateway logged why the hand-off fell back
        wait_for(lambda: _referenced(pair.prefill[0]) == (0, 0) and _referenced(pair.decode[0]) == (0, 0),
                 3 * LEASE_S, 0.1)
    finally:
        _signal(pair, 1, 1, signal.SIGCONT)
    _serving_again(pair, 1)
    _settled(pair)
