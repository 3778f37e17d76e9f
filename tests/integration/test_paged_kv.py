"""A TP1·PP2 replica whose KV pool is far smaller than its load: requests are admitted as
blocks free up, running ones are preempted and recomputed when blocks run out, and every
request still gets exactly the tokens it gets alone (greedy and seeded sampling), also when it
continues another run at an output position (``seed_offset``, what a migration sends). The same
for a Mixtral (MoE) demo of the same attention shape, whose recomputed tokens pass through
the experts again."""

from __future__ import annotations

import time

import grpc
import pytest

from stagekit.demo import write_demo_model
from stagemesh.launcher import Mesh, MeshSpec
from tests.helpers.stage_client import generate, generate_many, stage_info, tokens_of, wire

# demo model (llama and mixtral alike): 2 layers per stage
# x K,V x 16 tokens x 2 KV heads x 16 dims x 4 bytes = 8 KiB per block
BLOCKS = 12
PROMPTS = [[3, 10 + i, 20 + i, 30, 40 + 2 * i, 50, 60 + i, 7, 8, 9] for i in range(6)]
MAX_TOKENS = 40  # 50 tokens = 4 blocks per request; 6 requests want 24 of the 12 blocks


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def small_pool(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(f"paged-{request.param}")
    model = write_demo_model(root / "demo", arch=request.param)
    mesh = Mesh(MeshSpec(model=str(model), layer_splits=[(0, 2), (2, 4)], threads=1, gateway=False,
                         kv_cache_memory=str(BLOCKS * 8192)), root / "logs")
    try:
        mesh.start(timeout_s=120)
        wire(mesh.replicas[0])
        yield mesh.replicas[0]
    finally:
        mesh.stop()


def test_pool_size_is_reported(small_pool) -> None:
    for addr in small_pool:
        info = stage_info(addr)
        assert info.kv_capacity_tokens == BLOCKS * 16 and info.kv_block_size == 16


SEEDED = dict(temperature=1.0, top_p=0.9, seed=11)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, seed=11), SEEDED],
                         ids=["greedy", "seeded", "seeded-top_p"])
def test_preempted_requests_get_the_tokens_they_get_alone(small_pool, sampling) -> None:
    head = small_pool[0]
    alone = [tokens_of(generate(head, p, max_tokens=MAX_TOKENS, ignore_eos=True, **sampling)) for p in PROMPTS]
    before = stage_info(head).num_preemptions
    together = [tokens_of(r) for r in generate_many(head, PROMPTS, max_tokens=MAX_TOKENS, ignore_eos=True,
                                                    **sampling)]
    assert stage_info(head).num_preemptions > before, "the pool was expected to run out"
    assert together == alone
    assert all(len(t) == MAX_TOKENS for t in together)
    deadline = time.monotonic() + 10   # the frees ride on the step after the last token
    while any(stage_info(a).kv_used_tokens for a in small_pool) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [stage_info(a).kv_used_tokens for a in small_pool] == [0, 0]  # every block came back


def test_seeded_continuations_under_preemption_draw_what_the_whole_run_drew(small_pool) -> None:
    """Each request continued at output position k, with its first k tokens appended to its
    prompt (a migrated request), gets the whole run's tokens from k on, preempted or not."""
    head, k = small_pool[0], 15
    whole = [tokens_of(generate(head, p, max_tokens=MAX_TOKENS, ignore_eos=True, **SEEDED)) for p in PROMPTS]
    assert len({t for w in whole for t in w}) > 20  # really sampled
    before = stage_info(head).num_preemptions
    prompts = [p + w[:k] for p, w in zip(PROMPTS, whole, strict=True)]
    rest = [tokens_of(r) for r in generate_many(head, prompts, max_tokens=MAX_TOKENS - k, ignore_eos=True,
                                                seed_offset=k, **SEEDED)]
    assert stage_info(head).num_preemptions > before, "the pool was expected to run out"
    assert rest == [w[k:] for w in whole]


def test_a_request_larger_than_the_pool_is_refused(small_pool) -> None:
    with pytest.raises(grpc.RpcError) as err:
        generate(small_pool[0], PROMPTS[0], max_tokens=BLOCKS * 16)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "KV cache" in err.value.details()


def test_a_share_of_free_memory_sizes_the_pool_of_every_rank(tmp_path) -> None:
    model = write_demo_model(tmp_path / "demo")
    mesh = Mesh(MeshSpec(model=str(model), layer_splits=[(0, 4)], tp=2, threads=1, gateway=False,
                         kv_cache_memory="1%"), tmp_path / "logs")
    try:
        mesh.start(timeout_s=120)
        head = mesh.replicas[0][0]
        blocks = stage_info(head).kv_capacity_tokens // 16
        # 1% of MemAvailable over 2 ranks at 8 KiB per block (4 layers, 1 KV head per rank): thousands
        assert blocks > 1000
        out = generate(head, PROMPTS[0], max_tokens=5, ignore_eos=True)
        assert len(tokens_of(out)) == 5
    finally:
        mesh.stop()


@pytest.mark.parametrize(("arch", "stage_args"), [
    pytest.param("llama", [], id="llama"),
    pytest.param("mixtral", ["--moe-parallel", "ep"], id="mixtral-ep", marks=pytest.mark.slow)])
def test_preemption_under_tensor_parallelism(arch: str, stage_args: list[str], tmp_path) -> None:
    """The same pressure on TP2 stages: every rank keeps the same block tables (preempted
    sequences dropped on all of them) and the tokens equal those of an unconstrained pool;
    also with a MoE model's experts placed over the two ranks."""
    model = write_demo_model(tmp_path / "demo", arch=arch)
    outs = {}
    for name, memory in (("small", str(BLOCKS * 4096)), ("large", "64MiB")):  # 4 KiB per block per rank at TP2
        mesh = Mesh(MeshSpec(model=str(model), layer_splits=[(0, 2), (2, 4)], tp=2, threads=1, gateway=False,
                             kv_cache_memory=memory, extra_stage_args=stage_args), tmp_path / f"logs-{name}")
        try:
            mesh.start(timeout_s=180)
            wire(mesh.replicas[0])
            head = mesh.replicas[0][0]
            outs[name] = [tokens_of(r) for r in generate_many(head, PROMPTS, max_tokens=MAX_TOKENS, ignore_eos=True)]
            if name == "small":
                assert stage_info(head).kv_capacity_tokens == BLOCKS * 16
                assert stage_info(head).num_preemptions > 0
        finally:
            mesh.stop()
    assert outs["small"] == outs["large"]
