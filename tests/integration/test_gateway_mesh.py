"""The official ``openai`` package against a live gateway process over two replicas of the demo
model (stage processes on loopback): completions and chat, streaming and not, usage, stop
strings, n=2, errors as the package's own exception types; overload (429), bad keys (401) and
malformed bodies (400) answered quickly, the gateway healthy after each; metrics of the gateway
and of the stages."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from stagemesh.launcher import Mesh
from tests.gateway.harness import wait_for
from tests.gateway.live import demo_mesh

KEY = "mesh-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "demo"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    # Tight admission limits (2 running per replica, 2 waiting in all) so that overload is cheap to cause.
    limits = ["--max-running-per-replica", "2", "--max-waiting-per-replica", "1", "--max-waiting", "2"]
    with demo_mesh(
        Path(tmp_path_factory.mktemp("gateway-mesh")),
        gateway=True,
        extra_gateway_args=[*limits, "--health-interval", "0.5"],
        gateway_env={"STAGEMESH_API_KEYS": KEY},
        stage_metrics=True,
    ) as m:
        yield m


@pytest.fixture(scope="module")
def oai(mesh: Mesh) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{mesh.url}/v1", api_key=KEY, max_retries=0, timeout=30)
    yield client
    client.close()


def assert_healthy(mesh: Mesh) -> None:
    health = httpx.get(f"{mesh.url}/health", timeout=10)
    assert health.status_code == 200
    assert [r["healthy"] for r in health.json()["replicas"]] == [True, True]


def test_models_and_health(oai: openai.OpenAI, mesh: Mesh) -> None:
    assert [m.id for m in oai.models.list().data] == [MODEL]
    assert_healthy(mesh)


def test_completion_stream_and_not(oai: openai.OpenAI) -> None:
    args = dict(model=MODEL, prompt="Hello, mesh", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    out = oai.completions.create(**args)  # type: ignore[call-overload]
    assert out.usage is not None and out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 0
    assert out.choices[0].finish_reason == "length" and out.choices[0].text
    chunks = list(oai.completions.create(**args, stream=True, stream_options={"include_usage": True}))  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text  # greedy: same text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_chat_stream_and_not(oai: openai.OpenAI) -> None:
    args = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_completion_tokens=6, temperature=0)
    out = oai.chat.completions.create(**args, extra_body={"ignore_eos": True})  # type: ignore[call-overload]
    assert out.choices[0].message.role == "assistant"
    assert out.usage is not None and out.usage.completion_tokens == 6
    stream = oai.chat.completions.create(**args, stream=True, extra_body={"ignore_eos": True})  # type: ignore[call-overload]
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings(oai: openai.OpenAI) -> None:
    args = dict(model=MODEL, prompt="Stop here", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    text = oai.completions.create(**args).choices[0].text  # type: ignore[call-overload]
    start = next(i for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    stopped = oai.completions.create(**args, stop=[stop, "never-there"])  # type: ignore[call-overload]
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_n_2_token_prompt_and_logprobs(oai: openai.OpenAI) -> None:
    out = oai.completions.create(model=MODEL, prompt=[3, 200, 201, 202], max_tokens=5, n=2, temperature=0.9, seed=5,
                                 logprobs=2, extra_body={"ignore_eos": True})  # fmt: skip
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage is not None and out.usage.completion_tokens == 10 and out.usage.prompt_tokens == 4
    for choice in out.choices:
        assert choice.logprobs is not None and len(choice.logprobs.tokens or []) == 5
        assert all(len(top) >= 1 for top in choice.logprobs.top_logprobs or [])


def test_errors_are_the_packages_exceptions(oai: openai.OpenAI, mesh: Mesh) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        oai.completions.create(model=MODEL, prompt="Hello", max_tokens=100_000)
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"
    bad = openai.OpenAI(base_url=f"{mesh.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    bad.close()
    assert_healthy(mesh)


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"{not json", "not valid JSON"),
        (b'{"prompt": 5, "max_tokens": 2}', "'prompt'"),
        (b'{"max_tokens": 2}', "'prompt'"),
        (b'{"prompt": "hi", "max_tokens": "many"}', "'max_tokens'"),
    ],
)
def test_malformed_bodies_are_400(mesh: Mesh, content: bytes, needle: str) -> None:
    r = httpx.post(f"{mesh.url}/v1/completions", content=content, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400
    assert needle in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert_healthy(mesh)


def test_bad_key_is_401(mesh: Mesh) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        r = httpx.post(f"{mesh.url}/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert_healthy(mesh)


def test_overload_is_429_quickly(mesh: Mesh, oai: openai.OpenAI) -> None:
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    stop = threading.Event()
    statuses: list[int] = []

    def long_request() -> None:
        with httpx.stream("POST", f"{mesh.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            statuses.append(r.status_code)
            for _ in r.iter_lines():
                if stop.is_set():
                    break

    threads = [threading.Thread(target=long_request) for _ in range(6)]  # 2 x 2 running + 2 waiting
    for t in threads:
        t.start()

    def saturated() -> bool:
        replicas = httpx.get(f"{mesh.url}/health", timeout=10).json()["replicas"]
        return sum(r["running"] for r in replicas) == 4 and sum(r["waiting"] for r in replicas) == 2

    try:
        wait_for(saturated, timeout_s=30, interval_s=0.05)
        start = time.monotonic()
        r = httpx.post(f"{mesh.url}/v1/completions", json={**body, "stream": False}, headers=AUTH, timeout=10)
        assert time.monotonic() - start < 2.0  # refused at once, not after the long ones
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            oai.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert statuses == [200] * 6
    wait_for(lambda: all(r["running"] == 0 for r in httpx.get(f"{mesh.url}/health").json()["replicas"]), 30)
    assert oai.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text is not None
    assert_healthy(mesh)


def test_gateway_and_stage_metrics(mesh: Mesh, oai: openai.OpenAI) -> None:
    oai.completions.create(model=MODEL, prompt="metrics", max_tokens=4)
    text = httpx.get(f"{mesh.url}/metrics", timeout=10).text
    for needle in (
        'stagemesh_requests_total{endpoint="/v1/completions",status="200"}',
        'stagemesh_requests_total{endpoint="/v1/completions",status="401"}',
        "stagemesh_prompt_tokens_total",
        "stagemesh_generation_tokens_total",
        "stagemesh_time_to_first_token_seconds_bucket",
        "stagemesh_inter_token_latency_seconds_bucket",
        "stagemesh_e2e_request_latency_seconds_count",
        'stagemesh_routing_decisions_total{policy="round_robin",replica="0"}',
        'stagemesh_routing_decisions_total{policy="round_robin",replica="1"}',
        'stagemesh_replica_requests_running{replica="1"}',
        'stagemesh_replica_requests_waiting{replica="0"}',
        'stagemesh_replica_healthy{replica="1"} 1.0',
    ):
        assert needle in text, needle
    assert len(mesh.stage_metrics_urls) == 2
    for url in mesh.stage_metrics_urls.values():
        stage = httpx.get(url, timeout=10).text
        for needle in (
            "stagemesh_stage_batch_size",
            "stagemesh_stage_kv_usage_ratio",
            "stagemesh_stage_step_seconds_bucket",
            "stagemesh_stage_transfer_bytes_total",
            "stagemesh_stage_requests_running",
            "stagemesh_stage_prefix_cache_hits_total",
        ):
            assert needle in stage, needle
        steps = next(line for line in stage.splitlines() if line.startswith("stagemesh_stage_steps_total"))
        assert float(steps.split()[-1]) > 0


def test_openapi_document(mesh: Mesh) -> None:
    doc = httpx.get(f"{mesh.url}/openapi.json", timeout=10).json()
    assert "CompletionRequest" in doc["components"]["schemas"]
    assert doc["paths"]["/v1/completions"]["post"]["security"] == [{"bearerAuth": []}]
