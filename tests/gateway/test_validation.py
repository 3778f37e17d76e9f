"""Bad requests are answered by the gateway (400/404, OpenAI error shape) before any stage sees them."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.gateway.fake_stage import FakeStage

HI = [{"role": "user", "content": "hi"}]

BAD_COMPLETIONS: list[tuple[dict[str, Any], str, str | None]] = [
    ({"prompt": ""}, "must not be empty", "prompt"),
    ({"prompt": []}, "must not be empty", "prompt"),
    ({"prompt": [[]]}, "must not be empty", "prompt"),
    ({"prompt": ["ok", ""]}, "must not be empty", "prompt"),
    ({"prompt": [1, 400]}, "out of vocabulary", "prompt"),
    ({"prompt": [-1]}, "out of vocabulary", "prompt"),
    ({"prompt": "Hello", "max_tokens": 200}, "maximum context length is 128 tokens", "max_tokens"),
    ({"prompt": [1] * 120, "max_tokens": 9}, "129 tokens (120 in the prompt, 9 for the completion)", "max_tokens"),
    ({"prompt": "Hello", "max_tokens": 0}, "'max_tokens' must be at least 1", "max_tokens"),
    ({"prompt": "Hello", "max_tokens": -3}, "'max_tokens' must be at least 1", "max_tokens"),
    ({"prompt": 5}, "invalid value for 'prompt'", "prompt"),
    ({"prompt": [1, True]}, "invalid value for 'prompt'", "prompt"),
    ({"prompt": "Hello", "max_tokens": "many"}, "invalid value for 'max_tokens'", "max_tokens"),
    ({"prompt": "Hello", "n": 0}, "'n' must be between", "n"),
    ({"prompt": "Hello", "temperature": -1}, "'temperature' must be 0 (greedy) or between 0.01 and 100", "temperature"),
    ({"prompt": "Hello", "top_p": 0}, "'top_p' must be in (0, 1]", "top_p"),
    ({"prompt": "Hello", "top_k": -2}, "'top_k'", "top_k"),
    ({"prompt": "Hello", "stop": [1]}, "invalid value for 'stop'", "stop"),
    ({"prompt": "Hello", "stop": [""]}, "Stop strings must not be empty", "stop"),
    ({"prompt": "Hello", "stop_token_ids": [999]}, "out of vocabulary", "stop_token_ids"),
    ({"prompt": "Hello", "min_tokens": 5, "max_tokens": 2}, "'min_tokens' (5) must not exceed", "min_tokens"),
    ({"prompt": "Hello", "echo": True}, "'echo' is not supported", "echo"),
    ({"prompt": "Hello", "logprobs": 50}, "'logprobs' must be between 0 and 20", "logprobs"),
    ({"prompt": "Hello", "stream_options": {"include_usage": True}}, "only allowed when 'stream'", "stream_options"),
    ({"prompt": "Hello", "frequency_penalty": 0.5}, "not supported", "frequency_penalty"),
    ({"max_tokens": 3}, "invalid value for 'prompt'", "prompt"),
]

BAD_CHATS: list[tuple[dict[str, Any], str, str | None]] = [
    ({"messages": []}, "at least one message", "messages"),
    ({"messages": "hi"}, "invalid value for 'messages'", "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "unknown role 'wizard'", "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "Unsupported role: tool", "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text content", "messages"),
    ({"messages": HI, "max_tokens": 500}, "maximum context length is 128 tokens", "max_tokens"),
    ({"messages": HI, "max_completion_tokens": 0}, "'max_tokens' must be at least 1", "max_tokens"),
    ({"messages": HI, "top_logprobs": 2}, "requires 'logprobs'", "top_logprobs"),
    ({"messages": HI, "tools": [{"type": "function"}]}, "not supported", "tools"),
    ({"messages": HI, "n": 1000}, "'n' must be between", "n"),
]


def assert_still_serving(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    ok = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def assert_error(response: httpx.Response, status: int, fragment: str, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"], error["message"]
    assert error["param"] == param
    return error


@pytest.mark.parametrize(("body", "fragment", "param"), BAD_COMPLETIONS)
def test_bad_completions(
    client: httpx.Client, head: FakeStage, body: dict[str, Any], fragment: str, param: str | None
) -> None:
    calls = len(head.generate_calls)
    error = assert_error(client.post("/v1/completions", json=body), 400, fragment, param)
    assert error["type"] == "invalid_request_error"
    assert len(head.generate_calls) == calls, "a stage saw an invalid request"
    assert_still_serving(client)


@pytest.mark.parametrize(("body", "fragment", "param"), BAD_CHATS)
def test_bad_chats(
    client: httpx.Client, head: FakeStage, body: dict[str, Any], fragment: str, param: str | None
) -> None:
    calls = len(head.generate_calls)
    assert_error(client.post("/v1/chat/completions", json=body), 400, fragment, param)
    assert len(head.generate_calls) == calls
    assert_still_serving(client)


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404(client: httpx.Client, stream: bool) -> None:
    response = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "Hello", "stream": stream})
    error = assert_error(response, 404, "'gpt-4' does not exist", "model")
    assert error["code"] == "model_not_found"
    assert_error(client.get("/v1/models/gpt-4"), 404, "does not exist", "model")
    assert_still_serving(client)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b'{"prompt": "Hello", "max_tokens": 3,}'])
def test_malformed_json(client: httpx.Client, content: bytes) -> None:
    response = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["message"].startswith("Invalid request")
    assert_still_serving(client)


def test_unknown_route_and_method(client: httpx.Client) -> None:
    assert client.get("/v1/nothing").json()["error"]["message"] == "Not Found"
    assert client.get("/v1/completions").status_code == 405
