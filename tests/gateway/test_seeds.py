"""Every request is sampled with a seed, which its response reports (REST: a top-level ``seed``
on the response and on every stream chunk; gRPC: ``seed`` on every message): the one it was sent
with, or a random one the gateway chose; sending it back reproduces the output."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from stagekit.client import GenerationClient
from tests.gateway.fake_stage import FakeStage
from tests.gateway.harness import GatewayThread
from tests.gateway.sse import post_stream

SAMPLED = {"prompt": "Hello", "max_tokens": 8, "temperature": 1.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def gw(replica: list[str]) -> Iterator[GatewayThread]:
    with GatewayThread([replica], grpc_port=0) as gateway:
        yield gateway


@pytest.fixture()
def client(gw: GatewayThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        yield c


def _post(client: httpx.Client, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_gateway_chooses_a_seed_reports_it_and_it_reproduces_the_text(
    client: httpx.Client, head: FakeStage
) -> None:
    outs = [_post(client, "/v1/completions", SAMPLED) for _ in range(3)]
    seeds = [o["seed"] for o in outs]
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds) and len(set(seeds)) == 3
    assert head.generate_calls[-1].sampling.seed == seeds[-1]  # the stage sampled with it
    texts = {o["choices"][0]["text"] for o in outs}
    assert len(texts) > 1  # the fake's offsets differ by seed: the texts are really sampled
    for out in outs:
        again = _post(client, "/v1/completions", {**SAMPLED, "seed": out["seed"]})
        assert again["seed"] == out["seed"] and again["choices"][0]["text"] == out["choices"][0]["text"]


def test_streams_and_chat_report_the_seed(client: httpx.Client) -> None:
    events, done = post_stream(client, "/v1/completions", {**SAMPLED, "stream_options": {"include_usage": True}})
    assert done and len({e["seed"] for e in events}) == 1  # on every chunk, usage chunk included
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    again = _post(client, "/v1/completions", {**SAMPLED, "seed": events[0]["seed"]})
    assert again["choices"][0]["text"] == text
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "ignore_eos": True, "seed": -17}
    assert _post(client, "/v1/chat/completions", chat)["seed"] == -17
    events, _ = post_stream(client, "/v1/chat/completions", chat)
    assert {e["seed"] for e in events} == {-17}


def test_greedy_requests_report_a_seed_too(client: httpx.Client) -> None:
    out = _post(client, "/v1/completions", {**SAMPLED, "temperature": 0})
    assert isinstance(out["seed"], int)


def test_choice_c_uses_seed_plus_c_wrapped_to_64_bits(client: httpx.Client, head: FakeStage) -> None:
    out = _post(client, "/v1/completions", {**SAMPLED, "n": 3, "seed": 2**63 - 2})
    assert out["seed"] == 2**63 - 2
    calls = {c.request_id: c.sampling.seed for c in head.generate_calls[-3:]}
    assert [calls[f"{out['id']}-{i}"] for i in range(3)] == [2**63 - 2, 2**63 - 1, -(2**63)]


def test_grpc_reports_the_seed_and_it_reproduces_the_text(gw: GatewayThread) -> None:
    with GenerationClient(gw.grpc_target, timeout_s=10) as c:
        done = c.complete("Hello", max_tokens=8, temperature=1.0, ignore_eos=True)
        assert done.seed is not None and 0 <= done.seed < 2**63
        chunks = list(c.generate("Hello", max_tokens=8, temperature=1.0, ignore_eos=True))
        seeds = {ch.seed for ch in chunks}
        assert len(seeds) == 1 and None not in seeds
        [seed] = seeds
        again = c.complete("Hello", max_tokens=8, temperature=1.0, ignore_eos=True, seed=seed)
        assert again.seed == seed and again.text == "".join(ch.text for ch in chunks)
        assert c.complete("Hello", max_tokens=8, temperature=1.0, ignore_eos=True, seed=done.seed).text == done.text
