from __future__ import annotations

import httpx

from tests.gateway.fake_stage import SCRIPT, FakeStage, script_ids, tokenizer
from tests.gateway.sse import post_stream

TOK = tokenizer()
SCRIPT_IDS = script_ids()
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


def chat(client: httpx.Client, **body: object) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_chat_renders_the_template(client: httpx.Client, head: FakeStage) -> None:
    out = chat(client, model="fake-model", max_tokens=6)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    [choice] = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": TOK.decode(SCRIPT_IDS[:6])}
    assert choice["finish_reason"] == "length" and choice["logprobs"] is None
    prompt = TOK.encode(TOK.apply_chat_template(MESSAGES), add_special_tokens=False)
    assert list(head.generate_calls[-1].prompt_token_ids) == prompt
    assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 6, "total_tokens": len(prompt) + 6}


def test_max_completion_tokens_and_default_length(client: httpx.Client) -> None:
    out = chat(client, max_completion_tokens=3, max_tokens=50)
    assert out["usage"]["completion_tokens"] == 3
    out = chat(client)  # no limit: runs to EOS
    assert out["choices"][0]["message"]["content"] == SCRIPT
    assert out["choices"][0]["finish_reason"] == "stop"


def test_content_parts(client: httpx.Client, head: FakeStage) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story."}]}]
    chat(client, messages=parts, max_tokens=2)
    expected = TOK.encode(TOK.apply_chat_template([{"role": "user", "content": "Tell me a story."}]), False)
    assert list(head.generate_calls[-1].prompt_token_ids) == expected


def test_chat_logprobs(client: httpx.Client) -> None:
    out = chat(client, max_tokens=4, logprobs=True, top_logprobs=3)
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    assert "".join(c["token"] for c in content) == out["choices"][0]["message"]["content"]
    assert all(len(c["top_logprobs"]) == 3 and c["bytes"] == list(c["token"].encode()) for c in content)
    assert all(c["top_logprobs"][2]["logprob"] == -9999.0 for c in content)  # -inf is not JSON


def test_chat_stream(client: httpx.Client) -> None:
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "n": 2, "stop": ["fox"]}
    events, done = post_stream(client, "/v1/chat/completions", body)
    assert done
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    for index in (0, 1):
        deltas = [c for e in events for c in e["choices"] if c["index"] == index]
        assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in d["delta"] for d in deltas[1:])
        assert "".join(d["delta"].get("content", "") for d in deltas) == TOK.decode(SCRIPT_IDS[:8])
        assert deltas[-1]["finish_reason"] == "length"


def test_chat_stream_usage(client: httpx.Client) -> None:
    body = {"messages": MESSAGES, "max_tokens": 5, "stream_options": {"include_usage": True}}
    events, done = post_stream(client, "/v1/chat/completions", body)
    assert done and events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == 5
    assert all(e["usage"] is None for e in events[:-1])
