"""Regressions from the first fuzzing pass, REST side, against a gateway on fake stages: sampling
values no sampler can use, a stage's refusal, lone surrogates, huge prompts (bounded before
tokenizing, tokenized off the event loop)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import pytest

from gateway.config import RequestLimits
from gateway.tokenizing import load_tokenizer
from tests.gateway.fake_stage import FakeStage
from tests.gateway.harness import GatewayThread
from tests.gateway.test_validation import assert_error, assert_still_serving

HI = [{"role": "user", "content": "hi"}]
GATE = "<<gate>>"


def post_raw(client: httpx.Client, path: str, body: str) -> httpx.Response:
    """A body as written (JSON's Infinity, NaN, \\u escapes reach the server as they are)."""
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    "sampling",
    ['"temperature": 1e-45', '"temperature": 0.005', '"temperature": 3.5e38', '"temperature": 1e400',
     '"temperature": Infinity', '"temperature": NaN', '"temperature": Infinity, "min_tokens": 1',
     '"temperature": 1e-45, "n": 2, "seed": 3'],
)
def test_temperatures_no_sampler_can_use_are_400(client: httpx.Client, head: FakeStage, sampling: str) -> None:
    calls = len(head.generate_calls)
    response = post_raw(client, "/v1/completions", f'{{"prompt": "hi", "max_tokens": 2, {sampling}}}')
    error = assert_error(response, 400, "must be 0 (greedy) or between 0.01 and 100", "temperature")
    assert error["type"] == "invalid_request_error"
    messages = '"messages": [{"role": "user", "content": "hi"}]'
    chat = post_raw(client, "/v1/chat/completions", f"{{{messages}, {sampling}}}")
    assert_error(chat, 400, "must be 0 (greedy)", "temperature")
    assert len(head.generate_calls) == calls, "a stage saw a temperature it cannot use"
    assert_still_serving(client)


def test_stop_ids_covering_the_vocabulary_with_min_tokens_are_400(client: httpx.Client, head: FakeStage) -> None:
    calls = len(head.generate_calls)
    body = {"prompt": "hi", "max_tokens": 4, "min_tokens": 2, "stop_token_ids": list(range(head.vocab_size))}
    assert_error(client.post("/v1/completions", json=body), 400, "cover the whole vocabulary", "stop_token_ids")
    # all but EOS: EOS is masked too until min_tokens, so nothing is left either
    body["stop_token_ids"] = [t for t in range(head.vocab_size) if t != head.eos_token_id]
    assert_error(client.post("/v1/completions", json=body), 400, "cover the whole vocabulary", "stop_token_ids")
    assert len(head.generate_calls) == calls
    body["min_tokens"] = 0  # nothing masked: the first token stops, as asked
    ok = client.post("/v1/completions", json=body)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "stop"
    assert_still_serving(client)


def test_a_seed_at_the_int64_edge_with_n_choices_wraps(client: httpx.Client, head: FakeStage) -> None:
    response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 3, "seed": 2**63 - 1})
    assert response.status_code == 200, response.text
    seeds = sorted(call.sampling.seed for call in head.generate_calls[-3:])  # choices run concurrently
    assert seeds == [-(2**63), -(2**63) + 1, 2**63 - 1]


def test_a_stage_refusal_is_400_and_keeps_the_replica(gateway: GatewayThread, client: httpx.Client,
                                                      head: FakeStage) -> None:
    head.fail_next = (grpc.StatusCode.INVALID_ARGUMENT, "temperature must be 0 (greedy) or between 0.01 and 100")
    response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert_error(response, 400, "temperature must be", None)
    replica = gateway.state.pool.replicas[0]
    assert replica.healthy and replica.last_error is None
    assert [r["healthy"] for r in client.get("/health").json()["replicas"]] == [True]
    assert_still_serving(client)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", '{"prompt": "\\ud800 hi", "max_tokens": 2}', "prompt"),
        ("/v1/completions", '{"prompt": ["ok", "hi \\udfff"], "max_tokens": 2}', "prompt"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800 hi"}]}', "messages"),
        ("/v1/chat/completions",
         '{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udc00"}]}]}', "messages"),
    ],
)
def test_a_lone_surrogate_is_400(client: httpx.Client, head: FakeStage, path: str, body: str, param: str) -> None:
    calls = len(head.generate_calls)
    assert_error(post_raw(client, path, body), 400, "unpaired UTF-16 surrogate", param)
    assert len(head.generate_calls) == calls
    paired = post_raw(client, "/v1/completions", '{"prompt": "\\ud83e\\udd8a hi", "max_tokens": 2}')  # a fox emoji
    assert paired.status_code == 200, paired.text


def test_an_error_quoting_a_lone_surrogate_renders(client: httpx.Client) -> None:
    response = post_raw(client, "/v1/completions", '{"model": "\\ud800", "prompt": "hi"}')
    assert response.status_code == 404
    assert response.json()["error"]["message"].startswith("The model '\ud800' does not exist")


class ProbeTokenizer:
    """The test tokenizer, watched: counts encodes, holds one whose text has ``GATE`` until
    released, and notes when the longest encode started and finished."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self._inner = load_tokenizer(files)
        self.encoded = 0
        self.entered, self.release = threading.Event(), threading.Event()
        self.big_started = threading.Event()
        self.big_finished_at = float("inf")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded += 1
        if GATE in text:
            self.entered.set()
            assert self.release.wait(30)
        big = len(text) > 100_000
        if big:
            self.big_started.set()
        ids = self._inner.encode(text, add_special_tokens=add_special_tokens)
        if big:
            self.big_finished_at = time.monotonic()
        return ids


def probed_gateway(replica: list[str], **config: Any) -> tuple[GatewayThread, list[ProbeTokenizer]]:
    made: list[ProbeTokenizer] = []

    def factory(files: dict[str, bytes]) -> ProbeTokenizer:
        made.append(ProbeTokenizer(files))
        return made[-1]

    return GatewayThread([replica], tokenizer_factory=factory, **config), made


def test_a_prompt_above_the_character_limit_is_refused_untokenized(replica: list[str]) -> None:
    gw, made = probed_gateway(replica)
    with gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        before = made[0].encoded
        # the fake model's context is 128 tokens: 32 characters a token allows 4096
        response = client.post("/v1/completions", json={"prompt": "x" * 4097, "max_tokens": 2})
        error = assert_error(response, 400, "4097 characters, above this gateway's limit of 4096", "prompt")
        assert error["code"] == "context_length_exceeded"
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * 5000}]})
        assert_error(chat, 400, "5000 characters", "messages")
        assert made[0].encoded == before, "a prompt above the limit was tokenized"
    gw, made = probed_gateway(replica, limits=RequestLimits(max_prompt_chars=10))
    with gw, httpx.Client(base_url=gw.url, timeout=10) as client:
        assert_error(client.post("/v1/completions", json={"prompt": "x" * 11}), 400, "limit of 10", "prompt")
        assert client.post("/v1/completions", json={"prompt": "x" * 10, "max_tokens": 2}).status_code == 200


def test_requests_and_health_are_served_while_a_prompt_is_tokenized(replica: list[str]) -> None:
    gw, made = probed_gateway(replica)
    with gw, httpx.Client(base_url=gw.url, timeout=10) as client, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client.post, "/v1/completions", json={"prompt": f"{GATE} hi", "max_tokens": 2})
        try:
            assert made[0].entered.wait(10)
            assert client.get("/health").status_code == 200
            assert client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2}).status_code == 200
            assert not slow.done(), "the gated request should still be tokenizing"
        finally:
            made[0].release.set()
        assert slow.result().status_code == 200


def test_health_answers_while_a_huge_prompt_is_tokenized(replica: list[str]) -> None:
    big = "The quick brown fox jumps over the lazy dog. " * 50_000  # 2.25 MB, under the body limit
    gw, made = probed_gateway(replica, limits=RequestLimits(max_prompt_chars=len(big)))
    with gw, httpx.Client(base_url=gw.url, timeout=60) as client, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client.post, "/v1/completions", json={"prompt": big, "max_tokens": 2})
        assert made[0].big_started.wait(30)
        assert client.get("/health").status_code == 200
        answered = time.monotonic()
        response = slow.result()
    assert answered < made[0].big_finished_at, "/health waited for the tokenizer"
    assert_error(response, 400, "maximum context length is 128 tokens", "max_tokens")  # tokenized, then refused
