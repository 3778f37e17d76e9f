"""Seeded sampling survives a dead stage: over two live replicas of the demo model, a sampled
request (temperature 1, top_p 0.9) whose replica's stage is SIGKILLed mid-stream continues on
the other replica and streams exactly the text of an undisturbed run, over REST (SSE) and gRPC.
The undisturbed run is sent without a seed; the seed the gateway reports for it is sent back,
so the test also shows that a reported seed reproduces a request."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from stagekit.client import GenerationClient
from stagemesh.launcher import Mesh
from tests.gateway.harness import GatewayThread, wait_for
from tests.gateway.live import demo_mesh, kill_stage, restart_stage

PROMPT = "Once upon a time"
SAMPLING = {"max_tokens": 400, "temperature": 1.0, "top_p": 0.9, "ignore_eos": True}
KILL_AFTER = 8  # chunks with tokens seen before the serving replica's stage dies


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with demo_mesh(Path(tmp_path_factory.mktemp("seeded"))) as m:
        yield m


class Killer:
    """Kills the stage of the replica serving the only request in flight, once, and brings it
    back when the test ends (the mesh is the module's)."""

    def __init__(self, mesh: Mesh, gw: GatewayThread) -> None:
        self.mesh, self.gw = mesh, gw
        self.killed: int | None = None

    def maybe_kill(self, chunks_with_tokens: int) -> None:
        if self.killed is not None or chunks_with_tokens < KILL_AFTER:
            return
        running = [r.gate.running for r in self.gw.state.pool.replicas]
        assert sorted(running) == [0, 1], running
        self.killed = running.index(1)
        kill_stage(self.mesh, self.killed)

    def restore(self) -> None:
        if self.killed is not None:
            restart_stage(self.mesh, self.killed)


def _migrations(gw: GatewayThread) -> float:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    found = re.search(r'stagemesh_request_retries_total\{kind="migration"\} ([\d.]+)', text)
    return float(found.group(1)) if found else 0.0


def _rest_stream(gw: GatewayThread, body: dict, on_chunk: Callable[[int], None] = lambda n: None) -> tuple[str, int]:
    """The streamed text and the seed the response reports (on every chunk)."""
    text, seeds, with_tokens = "", set(), 0
    payload = {"prompt": PROMPT, "stream": True, **SAMPLING, **body}
    with httpx.stream("POST", f"{gw.url}/v1/completions", json=payload, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            seeds.add(event["seed"])
            piece = event["choices"][0]["text"]
            text += piece
            with_tokens += bool(piece)
            on_chunk(with_tokens)
    assert len(seeds) == 1
    return text, seeds.pop()


def test_rest_stream_killed_mid_stream_gives_the_undisturbed_text(mesh: Mesh) -> None:
    with GatewayThread(mesh.replicas, startup_timeout_s=60) as gw:
        killer = Killer(mesh, gw)
        try:
            reference, seed = _rest_stream(gw, {})
            assert _migrations(gw) == 0
            text, same_seed = _rest_stream(gw, {"seed": seed}, killer.maybe_kill)
            assert killer.killed is not None and _migrations(gw) == 1
            assert same_seed == seed and text == reference
        finally:
            killer.restore()


def test_grpc_stream_killed_mid_stream_gives_the_undisturbed_tokens(mesh: Mesh) -> None:
    with GatewayThread(mesh.replicas, startup_timeout_s=60, grpc_port=0) as gw:
        wait_for(lambda: all(r["healthy"] for r in httpx.get(f"{gw.url}/health").json()["replicas"]), timeout_s=30)
        killer = Killer(mesh, gw)
        try:
            with GenerationClient(gw.grpc_target, timeout_s=120) as client:
                reference = list(client.generate(PROMPT, **SAMPLING))
                seed = reference[0].seed
                assert seed is not None
                tokens: list[int] = []
                text = ""
                with_tokens = 0
                for chunk in client.generate(PROMPT, seed=seed, **SAMPLING):
                    assert chunk.seed == seed
                    tokens += chunk.token_ids
                    text += chunk.text
                    with_tokens += bool(chunk.token_ids)
                    killer.maybe_kill(with_tokens)
            assert killer.killed is not None and _migrations(gw) == 1
            assert tokens == [t for c in reference for t in c.token_ids]
            assert len(tokens) == SAMPLING["max_tokens"] and len(set(tokens)) > 20  # sampled, not a loop
            assert text == "".join(c.text for c in reference)
        finally:
            killer.restore()
