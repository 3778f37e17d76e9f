"""The official ``openai`` package against the gateway, unchanged."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import openai
import pytest

from tests.gateway.fake_stage import MAX_MODEL_LEN, FakeStage, script_ids, tokenizer
from tests.gateway.harness import GatewayThread

TOK = tokenizer()
EXPECTED_5 = TOK.decode(script_ids()[:5])


@pytest.fixture()
def oai(gateway: GatewayThread) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0, timeout=10)
    yield client
    client.close()


def test_models(oai: openai.OpenAI) -> None:
    [model] = oai.models.list().data
    assert model.id == "fake-model" and model.owned_by == "stagemesh"
    assert model.model_extra["max_model_len"] == MAX_MODEL_LEN
    assert oai.models.retrieve("fake-model").id == "fake-model"


def test_completion(oai: openai.OpenAI) -> None:
    out = oai.completions.create(model="fake-model", prompt="Hello", max_tokens=5, temperature=0)
    assert out.choices[0].text == EXPECTED_5
    assert out.usage is not None and out.usage.completion_tokens == 5


def test_completion_stream(oai: openai.OpenAI) -> None:
    stream = oai.completions.create(
        model="fake-model",
        prompt="Hello",
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == EXPECTED_5
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_chat(oai: openai.OpenAI) -> None:
    out = oai.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=5,
        temperature=0,
        extra_body={"top_k": 5, "ignore_eos": True, "min_tokens": 1},
    )
    assert out.choices[0].message.content == EXPECTED_5
    assert out.choices[0].finish_reason == "length"


def test_chat_stream(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == EXPECTED_5
    assert chunks[-1].choices[0].finish_reason == "length"


def test_errors_surface_as_typed_exceptions(oai: openai.OpenAI, head: FakeStage) -> None:
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128"):
        oai.completions.create(model="fake-model", prompt="Hello", max_tokens=1000)
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"
    head.fail_next = (grpc.StatusCode.RESOURCE_EXHAUSTED, "the KV cache is full")
    with pytest.raises(openai.RateLimitError, match="KV cache is full"):
        oai.completions.create(model="fake-model", prompt="Hello", max_tokens=2, stream=True)
    head.fail_next = (grpc.StatusCode.INVALID_ARGUMENT, "stage says no")
    with pytest.raises(openai.BadRequestError, match="stage says no"):
        oai.completions.create(model="fake-model", prompt="Hello", max_tokens=2)
    assert oai.completions.create(model="fake-model", prompt="Hello", max_tokens=2).choices[0].text
