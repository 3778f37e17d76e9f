"""The Python SDK (stagekit.client, sync and asyncio) against ``stagemesh up --dp 2`` run as a
user runs it: tokens stream from the live mesh over gRPC, the same mesh serves REST, deadlines
cut long generations short, failures arrive as typed errors; gRPC health and reflection."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from stagekit.client import (
    AsyncGenerationClient,
    DeadlineExceeded,
    GenerationClient,
    InvalidRequest,
    NotFound,
    Unauthenticated,
)
from stagekit.ports import free_port
from tests.gateway.harness import wait_for

KEY = "sk-local"  # the README's Clients section uses this key
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """``stagemesh up --dp 2`` with an API key; (HTTP base URL, gRPC target)."""
    home = tmp_path_factory.mktemp("sdk-home")
    port, grpc_port = free_port(), free_port()
    env = dict(os.environ, XDG_CACHE_HOME=str(home / "cache"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stagemesh.cli.main", "up", "--dp", "2", "--port", str(port), "--grpc-port",
         str(grpc_port), "--threads", "1", "--api-key", KEY, "--log-dir", str(home / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "stagemesh is up" in line:
                break
        assert any(f"gRPC 127.0.0.1:{grpc_port}" in line for line in lines), "".join(lines)
        yield f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture()
def client(up: tuple[str, str]) -> Iterator[GenerationClient]:
    with GenerationClient(up[1], api_key=KEY, timeout_s=60) as c:
        yield c


def test_sync_streaming_from_the_mesh(client: GenerationClient) -> None:
    [model] = client.list_models()
    stream = client.generate("Hello, mesh", model=model.id, max_tokens=12, temperature=0, ignore_eos=True)
    chunks = list(stream)
    assert len(chunks) >= 2  # tokens arrive as they are generated, not in one piece
    assert sum(len(c.token_ids) for c in chunks) == 12
    assert chunks[-1].finish_reason == "length"
    assert stream.usage is not None and stream.usage.completion_tokens == 12
    text = "".join(c.text for c in chunks)
    assert client.complete("Hello, mesh", max_tokens=12, temperature=0, ignore_eos=True).text == text  # greedy


def test_rest_and_grpc_agree(up: tuple[str, str], client: GenerationClient) -> None:
    body = {"prompt": "Same answer", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    rest = httpx.post(f"{up[0]}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert rest.status_code == 200
    grpc_text = client.complete("Same answer", max_tokens=8, temperature=0, ignore_eos=True).text
    assert rest.json()["choices"][0]["text"] == grpc_text


def test_async_streaming_chat_and_token_ids(up: tuple[str, str]) -> None:
    async def main() -> None:
        async with AsyncGenerationClient(up[1], api_key=KEY) as c:
            texts = []
            stream = c.generate(messages=[{"role": "user", "content": "hi"}], max_tokens=6, ignore_eos=True, seed=1)
            async for chunk in stream:
                texts.append(chunk.text)
            assert stream.usage is not None and stream.usage.completion_tokens == 6
            out = await c.complete([3, 200, 201], max_tokens=4, n=2, temperature=0.8, seed=3, logprobs=1)
            assert [ch.index for ch in out.choices] == [0, 1]
            assert all(len(ch.token_ids) == 4 and len(ch.logprobs) == 4 for ch in out.choices)
            many = await asyncio.gather(*(c.complete(f"q{i}", max_tokens=3, ignore_eos=True) for i in range(6)))
            assert all(m.usage.completion_tokens == 3 for m in many)

    asyncio.run(main())


def test_deadlines(client: GenerationClient, up: tuple[str, str]) -> None:
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        for _ in client.generate("Never ending", max_tokens=1800, ignore_eos=True, timeout=0.5):
            pass
    with pytest.raises(DeadlineExceeded):
        client.complete("Never ending", max_tokens=1800, ignore_eos=True, timeout=0.5)
    assert time.monotonic() - start < 5

    # The gateway gave the stage slots back: nothing stays running.
    def idle() -> bool:
        health = httpx.get(f"{up[0]}/health", timeout=10).json()
        return all(r["running"] == 0 for r in health["replicas"])

    wait_for(idle, timeout_s=10)


def test_typed_errors(client: GenerationClient, up: tuple[str, str]) -> None:
    with pytest.raises(InvalidRequest, match="maximum context length"):
        client.complete("Hello", max_tokens=100_000)
    with pytest.raises(InvalidRequest, match="vocabulary"):
        client.complete([1, 999_999], max_tokens=2)
    with pytest.raises(NotFound, match="no-such-model"):
        client.complete("Hello", model="no-such-model")
    with GenerationClient(up[1], api_key="wrong") as other, pytest.raises(Unauthenticated):
        list(other.generate("Hello", max_tokens=2))
    assert client.complete("still fine", max_tokens=2).usage.completion_tokens == 2


def test_health_and_reflection(up: tuple[str, str]) -> None:
    with grpc.insecure_channel(up[1]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="stagemesh.v1.Generation")
        answer = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert answer.file_descriptor_response.file_descriptor_proto  # grpcurl can describe the API


def test_readme_clients_examples_work_as_written(up: tuple[str, str]) -> None:
    """Every example of the README's Clients section, run against this mesh (same key, its ports)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Clients\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(bash|python)\n(.*?)```", section, re.S)
    assert len(blocks) >= 4
    url, target = up
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for lang, code in blocks:
        code = code.replace("127.0.0.1:8000", url.removeprefix("http://")).replace("127.0.0.1:8001", target)
        if "stagemesh up" in code:
            assert "--dp 2" in code and f"--api-key {KEY}" in code  # what the `up` fixture runs
            continue
        if lang == "bash":
            if shutil.which("curl") is None:
                continue
            done = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            assert "data: [DONE]" in done.stdout and '"status":"ok"' in done.stdout
        else:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
            assert done.returncode == 0, f"{code}\n{done.stdout}\n{done.stderr}"
