"""A live TP1·PP2 replica of the demo model, driven over the Stage gRPC API: sampling
controls, finish reasons, bad input answered with INVALID_ARGUMENT, and the replica keeps
serving after each."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from tests.helpers.stage_client import demo_replica, generate, generate_many, stage_info, tokens_of

PROMPT = [3, 200, 201, 202, 50, 60]


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    with demo_replica(tmp_path_factory.mktemp("replica")) as pipeline:
        yield pipeline


def test_health_and_info_describe_each_stage(replica) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for i, (addr, (start, end)) in enumerate(zip(replica, [(0, 2), (2, 4)], strict=True)):
        with grpc.insecure_channel(addr) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        info = stage_info(addr)
        assert (info.model_name, info.architecture) == ("demo", "LlamaForCausalLM")
        assert (info.start_layer, info.end_layer, info.num_layers, info.tp_size) == (start, end, 4, 1)
        assert info.dtype == "float32" and info.kv_capacity_tokens > 0
        assert (info.is_first, info.is_last, info.wired) == (i == 0, i == 1, True)


def _greedy(head: str, n: int = 8) -> list[int]:
    return tokens_of(generate(head, PROMPT, temperature=0.0, max_tokens=n, ignore_eos=True))


def test_greedy_is_deterministic_and_batch_independent(replica) -> None:
    alone = _greedy(replica[0])
    batched = generate_many(replica[0], [PROMPT, [9, 9, 9], PROMPT[:3]], temperature=0.0, max_tokens=8,
                            ignore_eos=True)
    assert tokens_of(batched[0]) == alone
    assert len(alone) == 8


def test_seed_reproduces_and_differs(replica) -> None:
    def run(seed: int) -> list[int]:
        return tokens_of(generate(replica[0], PROMPT, temperature=1.5, seed=seed, max_tokens=12, ignore_eos=True))

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c


def test_top_k_one_is_greedy(replica) -> None:
    sampled = tokens_of(generate(replica[0], PROMPT, temperature=1.0, top_k=1, seed=3, max_tokens=8,
                                 ignore_eos=True))
    assert sampled == _greedy(replica[0])


def test_top_p_tiny_is_greedy(replica) -> None:
    sampled = tokens_of(generate(replica[0], PROMPT, temperature=1.0, top_p=1e-6, seed=3, max_tokens=8,
                                 ignore_eos=True))
    assert sampled == _greedy(replica[0])


def test_finish_reasons_and_stop_ids(replica) -> None:
    greedy = _greedy(replica[0], 8)
    out = generate(replica[0], PROMPT, temperature=0.0, max_tokens=8, ignore_eos=True)
    assert out[-1].finish_reason == 2  # LENGTH
    assert out[-1].prompt_tokens == len(PROMPT) and out[-1].completion_tokens == 8
    stop_at = greedy[3]
    first = greedy.index(stop_at)
    out = generate(replica[0], PROMPT, temperature=0.0, max_tokens=8, stop_token_ids=[stop_at])
    assert tokens_of(out) == greedy[: first + 1]
    assert out[-1].finish_reason == 1  # STOP


def test_min_tokens_suppresses_stop_ids(replica) -> None:
    greedy = _greedy(replica[0], 8)
    out = tokens_of(generate(replica[0], PROMPT, temperature=0.0, max_tokens=8, min_tokens=6,
                             stop_token_ids=[greedy[0]]))
    assert greedy[0] not in out[:6]
    assert len(out) >= 6


@pytest.mark.parametrize(
    "prompt, sampling, message",
    [
        ([5, 1024], dict(max_tokens=4), "outside the vocabulary"),
        ([], dict(max_tokens=4), "prompt is empty"),
        ([5] * 10, dict(max_tokens=2045), "exceeds the model's context length"),
        ([5, 6], dict(max_tokens=0), "max_tokens must be at least 1"),
        ([5, 6], dict(max_tokens=-3), "max_tokens must be at least 1"),
        ([5, 6], dict(max_tokens=4, temperature=-1), "temperature"),
    ],
)
def test_bad_requests_are_invalid_argument(replica, prompt, sampling, message) -> None:
    with pytest.raises(grpc.RpcError) as err:
        generate(replica[0], prompt, **sampling)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert len(_greedy(replica[0], 2)) == 2  # still serving


def test_generate_on_a_downstream_stage_is_refused(replica) -> None:
    with pytest.raises(grpc.RpcError) as err:
        generate(replica[1], PROMPT, max_tokens=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "replica head" in err.value.details()


def test_wiring_out_of_order_is_refused(replica) -> None:
    with grpc.insecure_channel(replica[0]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            stage_pb2_grpc.StageStub(ch).Wire(stage_pb2.WireRequest(pipeline=list(reversed(replica)), index=1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(_greedy(replica[0], 2)) == 2


def test_abort_ends_a_running_request(replica) -> None:
    with grpc.insecure_channel(replica[0]) as ch:
        stub = stage_pb2_grpc.StageStub(ch)
        req = stage_pb2.GenerateRequest(request_id="to-abort", prompt_token_ids=PROMPT)
        req.sampling.max_tokens = 1500
        req.sampling.ignore_eos = True
        stream = stub.Generate(req)
        first = next(stream)
        assert first.token_ids
        assert stub.Abort(stage_pb2.AbortRequest(request_id="to-abort")).found
        rest = list(stream)
        assert rest[-1].finish_reason == 3  # ABORT
        assert sum(len(r.token_ids) for r in rest) < 1499
        assert not stub.Abort(stage_pb2.AbortRequest(request_id="to-abort")).found


def test_prefix_cache_reuse_gives_the_cold_tokens(replica) -> None:
    shared = [(7 * i) % 900 + 10 for i in range(48)]  # three full blocks
    prompt_b = shared + [4, 5, 6]
    cold = _greedy_of(replica[0], prompt_b)
    hits = stage_info(replica[0]).prefix_hit_tokens
    _greedy_of(replica[0], shared + [1, 2, 3])  # shares the three blocks
    warm = _greedy_of(replica[0], prompt_b)
    assert warm == cold
    assert stage_info(replica[0]).prefix_hit_tokens - hits == 2 * 48


def _greedy_of(head: str, prompt: list[int]) -> list[int]:
    return tokens_of(generate(head, prompt, temperature=0.0, max_tokens=8, ignore_eos=True))
