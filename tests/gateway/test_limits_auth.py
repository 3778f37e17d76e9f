"""Request limits checked at the gateway (400/413), API keys (401), and the OpenAPI document."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from gateway.config import RequestLimits
from tests.gateway.fake_stage import FakeStage
from tests.gateway.harness import GatewayThread


@pytest.fixture(scope="module")
def limited(replica: list[str]) -> Iterator[GatewayThread]:
    limits = RequestLimits(max_prompt_tokens=8, max_tokens=10, max_body_bytes=4000)
    with GatewayThread([replica], api_keys=("key-a", "key-b"), limits=limits) as gw:
        yield gw


def post(gw: GatewayThread, path: str, key: str | None = "key-a", **kwargs: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{gw.url}{path}", headers=headers, timeout=10, **kwargs)  # type: ignore[arg-type]


def test_keys(limited: GatewayThread) -> None:
    body = {"prompt": "Hello", "max_tokens": 2}
    assert post(limited, "/v1/completions", json=body).status_code == 200
    assert post(limited, "/v1/completions", key="key-b", json=body).status_code == 200
    for key in ("key-c", None, "key-a-but-longer"):
        r = post(limited, "/v1/completions", key=key, json=body)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        assert "key-" not in r.text  # keys are never echoed
    assert httpx.get(f"{limited.url}/v1/models").status_code == 401
    assert httpx.get(f"{limited.url}/health").status_code == 200
    assert httpx.get(f"{limited.url}/metrics").status_code == 200


def test_prompt_and_max_tokens_limits(limited: GatewayThread, head: FakeStage) -> None:
    calls = len(head.generate_calls)
    r = post(limited, "/v1/completions", json={"prompt": list(range(3, 12)), "max_tokens": 2})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "limit of 8" in r.json()["error"]["message"]
    r = post(limited, "/v1/completions", json={"prompt": "Hi", "max_tokens": 11})
    assert r.status_code == 400 and "limit of 10" in r.json()["error"]["message"]
    assert len(head.generate_calls) == calls  # no stage saw them
    chat = post(limited, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400  # the chat template alone is longer than 8 tokens
    ok = post(limited, "/v1/completions", json={"prompt": "Hi", "max_tokens": 10, "ignore_eos": True})
    assert ok.json()["usage"]["completion_tokens"] == 10


def test_body_limit_is_413(limited: GatewayThread) -> None:
    big = {"prompt": "x" * 5000, "max_tokens": 2}
    r = post(limited, "/v1/completions", json=big)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'", "max_tokens": 2}'

    r = httpx.post(
        f"{limited.url}/v1/completions",
        content=chunks(),
        headers={"content-type": "application/json", "Authorization": "Bearer key-a"},
        timeout=10,
    )
    assert r.status_code == 413
    assert post(limited, "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_openapi_matches_the_endpoints(limited: GatewayThread) -> None:
    doc = httpx.get(f"{limited.url}/openapi.json").json()
    schemas = doc["components"]["schemas"]
    completion = schemas["CompletionRequest"]["properties"]
    for field in ("prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "n", "stop", "stream",
                  "stream_options", "logprobs", "ignore_eos", "min_tokens", "stop_token_ids"):  # fmt: skip
        assert field in completion, field
    assert "prompt" in schemas["CompletionRequest"]["required"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    for field in ("messages", "max_completion_tokens", "logprobs", "top_logprobs"):
        assert field in chat, field
    post_op = doc["paths"]["/v1/completions"]["post"]
    assert post_op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")
    assert set(post_op["responses"]) == {"200", "400", "401", "404", "413", "429", "503"}
    assert "text/event-stream" in post_op["responses"]["200"]["content"]
    assert post_op["security"] == [{"bearerAuth": []}]
    assert "HTTPValidationError" not in schemas  # we answer 400 in OpenAI's shape, never 422
    assert doc["openapi"].startswith("3.1")
    error = schemas["ErrorResponse"]["properties"]["error"]["properties"]
    assert "nullable" not in str(doc)  # OpenAPI 3.0 only; 3.1 spells it {"type": "null"}
    assert {"type": "null"} in error["code"]["anyOf"] and {"type": "null"} in error["param"]["anyOf"]
    assert {"/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(doc["paths"])
