"""A replica that dies mid-request: the choice continues on another replica (or, with
migration off, fails only if it had produced tokens)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest

from tests.gateway.fake_stage import StageHost, script_ids, tokenizer
from tests.gateway.harness import GatewayThread, wait_for
from tests.gateway.sse import read_events

PROMPT_IDS = tokenizer().encode("Hello", add_special_tokens=True)


@pytest.fixture()
def pair(stage_host: StageHost) -> Iterator[list[list[str]]]:
    replicas = [stage_host.start_replica(1), stage_host.start_replica(1)]
    yield replicas
    for address in [a for r in replicas for a in r]:
        stage_host.stop(address)


def complete(gw: GatewayThread, **body: object) -> httpx.Response:
    payload = {"prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "temperature": 0, **body}
    return httpx.post(f"{gw.url}/v1/completions", json=payload, timeout=10)


@pytest.mark.parametrize("stream", [False, True])
def test_migration_continues_where_the_replica_stopped(
    stage_host: StageHost, pair: list[list[str]], stream: bool
) -> None:
    heads = [stage_host.stages[r[0]] for r in pair]
    heads[0].fail_after = (3, grpc.StatusCode.UNAVAILABLE, "stage went away")
    with GatewayThread(pair) as gw:
        response = complete(gw, stream=stream, stream_options={"include_usage": True} if stream else None)
        assert response.status_code == 200
        if stream:
            events, done = read_events(response)
            assert done
            text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
            usage = events[-1]["usage"]
            assert not any("error" in e for e in events)
        else:
            text, usage = response.json()["choices"][0]["text"], response.json()["usage"]
        assert usage["completion_tokens"] == 8
        first_three = script_ids()[:3]
        resumed = heads[1].generate_calls[-1]
        assert list(resumed.prompt_token_ids) == PROMPT_IDS + first_three  # the tokens so far, as prompt
        assert resumed.sampling.max_tokens == 5  # the rest of the budget
        assert text == tokenizer().decode(first_three + script_ids()[:5])  # the fake restarts its script
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert 'stagemesh_request_retries_total{kind="migration"} 1.0' in metrics


def test_without_migration_only_requests_with_tokens_fail(stage_host: StageHost, pair: list[list[str]]) -> None:
    heads = [stage_host.stages[r[0]] for r in pair]
    with GatewayThread(pair, migrate=False, health_interval_s=0.1) as gw:
        heads[0].fail_after = (3, grpc.StatusCode.UNAVAILABLE, "stage went away")
        response = complete(gw)
        assert response.status_code == 503  # it had tokens: not retried
        assert "stage went away" in response.json()["error"]["message"]
        wait_for(lambda: all(r["healthy"] for r in httpx.get(f"{gw.url}/health").json()["replicas"]))
        heads[1].fail_after = (0, grpc.StatusCode.UNAVAILABLE, "gone before any token")
        assert complete(gw).status_code == 200  # no token yet: retried on the other replica


def test_a_sampled_choice_continues_with_its_seed_at_its_output_position(
    stage_host: StageHost, pair: list[list[str]]
) -> None:
    body = {"temperature": 1.0, "min_tokens": 5}
    with GatewayThread(pair) as gw:
        undisturbed = complete(gw, **body).json()
    heads = [stage_host.stages[r[0]] for r in pair]
    heads[0].fail_after = (3, grpc.StatusCode.UNAVAILABLE, "stage went away")
    with GatewayThread(pair) as gw:
        migrated = complete(gw, **body, seed=undisturbed["seed"]).json()
    first, resumed = heads[0].generate_calls[-1], heads[1].generate_calls[-1]
    assert first.request_id == resumed.request_id == f"{migrated['id']}-0"
    assert resumed.sampling.seed == first.sampling.seed and resumed.sampling.HasField("seed")
    assert resumed.sampling.seed_offset == 3 and first.sampling.seed_offset == 0
    assert (resumed.sampling.max_tokens, resumed.sampling.min_tokens) == (5, 2)
    assert migrated["choices"][0]["text"] == undisturbed["choices"][0]["text"]
