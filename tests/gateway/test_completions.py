from __future__ import annotations

import time

import httpx
import pytest

from tests.gateway.fake_stage import SCRIPT, FakeStage, logprob_at, script_ids, tokenizer
from tests.gateway.sse import post_stream

TOK = tokenizer()
SCRIPT_IDS = script_ids()


def expected_text(num_tokens: int) -> str:
    return TOK.decode(SCRIPT_IDS[:num_tokens])


def complete(client: httpx.Client, **body: object) -> dict:
    response = client.post("/v1/completions", json={"temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_text_prompt_greedy(client: httpx.Client) -> None:
    out = complete(client, model="fake-model", prompt="Hello world", max_tokens=7)
    assert out["object"] == "text_completion"
    assert out["id"].startswith("cmpl-")
    assert out["model"] == "fake-model"
    [choice] = out["choices"]
    assert choice == {"index": 0, "text": expected_text(7), "logprobs": None, "finish_reason": "length"}
    prompt_tokens = len(TOK.encode("Hello world"))
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 7, "total_tokens": prompt_tokens + 7}


def test_default_max_tokens_is_16(client: httpx.Client) -> None:
    out = complete(client, prompt="Hello")
    assert out["usage"]["completion_tokens"] == 16


def test_eos_ends_with_stop(client: httpx.Client) -> None:
    out = complete(client, prompt="Hello", max_tokens=100)
    assert out["choices"][0]["text"] == SCRIPT
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == len(SCRIPT_IDS) + 1


def test_ignore_eos_and_min_tokens(client: httpx.Client) -> None:
    n = len(SCRIPT_IDS) + 5
    out = complete(client, prompt="Hello", max_tokens=n, ignore_eos=True)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == n
    out = complete(client, prompt="Hello", max_tokens=n, min_tokens=n)
    assert out["choices"][0]["finish_reason"] == "length"


def test_token_id_prompt_reaches_the_head(client: httpx.Client, head: FakeStage) -> None:
    out = complete(client, prompt=[5, 6, 7, 8], max_tokens=3)
    assert out["usage"]["prompt_tokens"] == 4
    assert out["choices"][0]["text"] == expected_text(3)
    call = head.generate_calls[-1]
    assert list(call.prompt_token_ids) == [5, 6, 7, 8]
    assert call.sampling.max_tokens == 3 and call.sampling.temperature == 0
    assert call.request_id == f"{out['id']}-0"


def test_batch_prompts_with_n(client: httpx.Client) -> None:
    out = complete(client, prompt=["Hello", "world is big"], n=2, max_tokens=4)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == expected_text(4) for c in out["choices"])
    assert out["usage"]["prompt_tokens"] == len(TOK.encode("Hello")) + len(TOK.encode("world is big"))
    assert out["usage"]["completion_tokens"] == 16
    out = complete(client, prompt=[[9, 10, 11], [12]], max_tokens=2)
    assert len(out["choices"]) == 2 and out["usage"]["prompt_tokens"] == 4


def test_seeded_samples_differ_per_choice_and_repeat(client: httpx.Client) -> None:
    body = {"prompt": "Hello", "n": 2, "max_tokens": 6, "temperature": 0.8, "seed": 1234}
    first = complete(client, **body)
    again = complete(client, **body)
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]]
    assert texts[0] != texts[1]


def test_stop_string_truncates_and_aborts(client: httpx.Client, head: FakeStage) -> None:
    out = complete(client, prompt="Hello", max_tokens=60, stop=["brown fox", "never"])
    choice = out["choices"][0]
    assert choice["text"] == SCRIPT[: SCRIPT.index("brown fox")]
    assert choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] < 60
    rid = f"{out['id']}-0"
    deadline = time.monotonic() + 2
    while rid not in head.aborted + head.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rid in head.aborted + head.cancelled


def test_min_tokens_mutes_stop_strings(client: httpx.Client) -> None:
    out = complete(client, prompt="Hello", max_tokens=8, stop="upon", min_tokens=5)
    assert out["choices"][0]["text"] == expected_text(8)
    assert out["choices"][0]["finish_reason"] == "length"


def test_stop_token_ids_hide_the_stop_token(client: httpx.Client) -> None:
    quick = TOK.encode(" quick", add_special_tokens=False)
    assert len(quick) == 1
    out = complete(client, prompt="Hello", max_tokens=60, stop_token_ids=quick)
    assert out["choices"][0]["text"] == SCRIPT[: SCRIPT.index(" quick")]
    assert out["choices"][0]["finish_reason"] == "stop"


def test_logprobs(client: httpx.Client) -> None:
    out = complete(client, prompt="Hello", max_tokens=5, logprobs=2)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert "".join(lp["tokens"]) == out["choices"][0]["text"]
    assert lp["token_logprobs"] == pytest.approx([logprob_at(k) for k in range(5)], abs=1e-5)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"])


def test_stream_logprobs_are_valid_json(client: httpx.Client) -> None:
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "logprobs": 3}
    events, done = post_stream(client, "/v1/completions", body)
    tokens = [t for e in events for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    assert done and len(tokens) == 4
    tops = [top for e in events for c in e["choices"] if c["logprobs"] for top in c["logprobs"]["top_logprobs"]]
    assert all(-9999.0 in top.values() for top in tops)


def test_stream(client: httpx.Client) -> None:
    events, done = post_stream(client, "/v1/completions", {"prompt": "Hello", "max_tokens": 9, "temperature": 0})
    assert done
    assert {e["object"] for e in events} == {"text_completion"}
    assert len({e["id"] for e in events}) == 1
    assert "".join(c["text"] for e in events for c in e["choices"]) == expected_text(9)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["finish_reason"] is None for e in events[:-1] for c in e["choices"])
    assert "usage" not in events[-1]


def test_stream_usage_and_stop_string(client: httpx.Client) -> None:
    body = {
        "prompt": [5, 6],
        "max_tokens": 60,
        "temperature": 0,
        "stop": "lazy",
        "n": 2,
        "stream_options": {"include_usage": True},
    }
    events, done = post_stream(client, "/v1/completions", body)
    assert done
    *chunks, usage = events
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == 2  # once per prompt, not per choice
    for index in (0, 1):
        text = "".join(c["text"] for e in chunks for c in e["choices"] if c["index"] == index)
        assert text == SCRIPT[: SCRIPT.index("lazy")]
        finishes = [c["finish_reason"] for e in chunks for c in e["choices"] if c["index"] == index]
        assert finishes[-1] == "stop"
    assert usage["usage"]["completion_tokens"] > 0
    assert usage["usage"]["total_tokens"] == 2 + usage["usage"]["completion_tokens"]
