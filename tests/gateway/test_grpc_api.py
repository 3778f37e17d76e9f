"""The gRPC Generation API and the SDK (stagekit.client) against a gateway on fake stages:
streaming, unary, chat, token ids, typed errors, deadlines, retries, health, reflection, TLS."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from stagekit.client import (
    NO_RETRY,
    AsyncGenerationClient,
    CapacityExceeded,
    DeadlineExceeded,
    GenerationClient,
    InvalidRequest,
    NotFound,
    RetryPolicy,
    StageUnavailable,
    Unauthenticated,
)
from tests.gateway.fake_stage import FakeStage, StageHost, script_ids, tokenizer
from tests.gateway.harness import GatewayThread, wait_for

KEY = "grpc-key"
EXPECTED_5 = tokenizer().decode(script_ids()[:5])


@pytest.fixture(scope="module")
def gw(replica: list[str]) -> Iterator[GatewayThread]:
    with GatewayThread([replica], api_key=KEY, grpc_port=0) as gateway:
        yield gateway


@pytest.fixture()
def client(gw: GatewayThread) -> Iterator[GenerationClient]:
    with GenerationClient(gw.grpc_target, api_key=KEY, timeout_s=10) as c:
        yield c


def test_generate_streams_text_then_usage(client: GenerationClient) -> None:
    stream = client.generate("Hello", max_tokens=5, temperature=0)
    chunks = list(stream)
    assert "".join(c.text for c in chunks) == EXPECTED_5
    assert [c.finish_reason for c in chunks][-1] == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert sum(len(c.token_ids) for c in chunks) == 5
    assert stream.usage is not None and stream.usage.completion_tokens == 5
    assert stream.request_id and stream.request_id.startswith("cmpl-")


def test_complete_n_logprobs_stop(client: GenerationClient) -> None:
    out = client.complete("Hello", max_tokens=5, temperature=0, n=2, logprobs=2)
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.text == EXPECTED_5 for c in out.choices)
    assert out.usage.completion_tokens == 10 and out.model == "fake-model"
    first = out.choices[0]
    assert len(first.logprobs) == 5 and len(first.top_logprobs) == 5 and len(first.top_logprobs[0]) == 2
    stopped = client.complete("Hello", max_tokens=10, temperature=0, stop=" upon")
    assert stopped.text == "Once" and stopped.choices[0].finish_reason == "stop"


def test_chat_and_token_ids(client: GenerationClient) -> None:
    chat = client.complete(messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
    assert chat.text == EXPECTED_5 and chat.request_id.startswith("chatcmpl-")
    ids = client.complete([5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3
    assert [m.id for m in client.list_models()] == ["fake-model"]


def test_typed_errors(gw: GatewayThread, client: GenerationClient, head: FakeStage) -> None:
    with pytest.raises(InvalidRequest, match="maximum context length") as err:
        client.complete("Hello", max_tokens=1000)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequest):
        client.complete("Hello", max_tokens=5, top_p=2.0)
    with pytest.raises(NotFound, match="gpt-4"):
        client.complete("Hello", model="gpt-4")
    for key in ("wrong", None):
        with GenerationClient(gw.grpc_target, api_key=key) as other, pytest.raises(Unauthenticated):
            other.list_models()
    with GenerationClient(gw.grpc_target, api_key=KEY, retry=NO_RETRY) as no_retry:
        head.fail_next = (grpc.StatusCode.RESOURCE_EXHAUSTED, "the KV cache is full")
        with pytest.raises(CapacityExceeded, match="KV cache is full"):
            list(no_retry.generate("Hello", max_tokens=2))
    with pytest.raises(InvalidRequest, match="exactly one"):
        client.complete()


def test_retry_before_the_first_chunk(gw: GatewayThread, head: FakeStage) -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
    with GenerationClient(gw.grpc_target, api_key=KEY, retry=policy) as c:
        head.fail_next = (grpc.StatusCode.RESOURCE_EXHAUSTED, "full right now")
        assert "".join(ch.text for ch in c.generate("Hello", max_tokens=5, temperature=0)) == EXPECTED_5
        head.fail_next = (grpc.StatusCode.RESOURCE_EXHAUSTED, "full right now")
        assert c.complete("Hello", max_tokens=5, temperature=0).text == EXPECTED_5


def test_deadline(client: GenerationClient, head: FakeStage) -> None:
    head.token_delay_s = 0.1
    calls = len(head.generate_calls)
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        list(client.generate("Hello", max_tokens=100, ignore_eos=True, timeout=0.3))
    assert time.monotonic() - start < 2
    with pytest.raises(DeadlineExceeded):
        client.complete("Hello", max_tokens=100, ignore_eos=True, timeout=0.3)
    # The gateway gave up on the stage requests too.
    wait_for(lambda: len(head.generate_calls) >= calls + 2, timeout_s=10)
    for call in head.generate_calls[calls:]:
        wait_for(lambda call=call: call.request_id in head.cancelled, timeout_s=10)


def test_async_client(gw: GatewayThread) -> None:
    async def main() -> tuple[str, int, str]:
        async with AsyncGenerationClient(gw.grpc_target, api_key=KEY) as c:
            stream = c.generate("Hello", max_tokens=5, temperature=0)
            text = "".join([chunk.text async for chunk in stream])
            assert stream.usage is not None
            out = await c.complete(messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
            with pytest.raises(NotFound):
                await c.complete("x", model="nope")
            return text, stream.usage.completion_tokens, out.text

    assert asyncio.run(main()) == (EXPECTED_5, 5, EXPECTED_5)


def test_health_reflection_metrics(gw: GatewayThread) -> None:
    with grpc.insecure_channel(gw.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "stagemesh.v1.Generation"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert {"stagemesh.v1.Generation", "grpc.health.v1.Health"} <= names
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert 'stagemesh_requests_total{endpoint="/stagemesh.v1.Generation/Generate",status="OK"}' in metrics
    assert 'endpoint="/stagemesh.v1.Generation/ListModels",status="UNAUTHENTICATED"' in metrics


def test_health_follows_the_replicas(stage_host: StageHost) -> None:
    lone = stage_host.start_replica(1)
    with GatewayThread([lone], grpc_port=0, health_interval_s=0.1) as gateway:
        with grpc.insecure_channel(gateway.grpc_target) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status() -> int:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status

            assert status() == health_pb2.HealthCheckResponse.SERVING
            stage_host.stop(lone[0])
            wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING)
            with GenerationClient(gateway.grpc_target, retry=NO_RETRY) as c, pytest.raises(StageUnavailable):
                c.complete("Hello", max_tokens=2)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(replica: list[str], tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    with GatewayThread([replica], grpc_port=0, tls_cert=str(cert), tls_key=str(key)) as gateway:
        with GenerationClient(gateway.grpc_target, tls=True, root_certificates=str(cert)) as c:
            assert c.complete("Hello", max_tokens=5, temperature=0).text == EXPECTED_5
        with GenerationClient(gateway.grpc_target, retry=NO_RETRY, timeout_s=3) as plain:
            with pytest.raises(StageUnavailable):  # a plaintext client cannot talk to a TLS server
                plain.list_models()
