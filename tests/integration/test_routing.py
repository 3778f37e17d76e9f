"""Routing over two live replicas of the demo model (one stage process each): round robin
alternates, least-loaded avoids a busy replica, prefix routing keeps a shared long prefix on
one replica; and a replica whose stage is killed mid-traffic: no request fails, /health shows
it down, and it is back after the stage restarts."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stagemesh.launcher import Mesh
from tests.gateway.harness import GatewayThread, wait_for
from tests.gateway.live import demo_mesh, kill_stage, restart_stage
from tests.gateway.sse import read_events


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with demo_mesh(Path(tmp_path_factory.mktemp("routing"))) as m:
        yield m


def gateway(mesh: Mesh, routing: str, **config: Any) -> GatewayThread:
    return GatewayThread(mesh.replicas, routing=routing, startup_timeout_s=60, **config)


def complete(gw: GatewayThread, prompt: str = "Hello", **body: Any) -> httpx.Response:
    payload = {"prompt": prompt, "max_tokens": 4, "temperature": 0, **body}
    response = httpx.post(f"{gw.url}/v1/completions", json=payload, timeout=60)
    assert response.status_code == 200, response.text
    return response


def decisions(gw: GatewayThread, policy: str) -> list[int]:
    """Requests routed to each replica so far (from /metrics)."""
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    counts = [0, 0]
    pattern = rf'stagemesh_routing_decisions_total{{policy="{policy}",replica="(\d)"}} ([\d.]+)'
    for replica, value in re.findall(pattern, text):
        counts[int(replica)] = int(float(value))
    return counts


def metric(gw: GatewayThread, line_prefix: str) -> float:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_prefix))


def replicas(gw: GatewayThread) -> list[dict[str, Any]]:
    return httpx.get(f"{gw.url}/health", timeout=10).json()["replicas"]


def test_round_robin_alternates(mesh: Mesh) -> None:
    with gateway(mesh, "round_robin") as gw:
        order = []
        for _ in range(6):
            before = decisions(gw, "round_robin")
            complete(gw)
            after = decisions(gw, "round_robin")
            order.append(next(i for i in (0, 1) if after[i] > before[i]))
        assert order in ([0, 1] * 3, [1, 0] * 3)


def test_least_loaded_avoids_a_busy_replica(mesh: Mesh) -> None:
    with gateway(mesh, "least_loaded") as gw:
        body = {"prompt": "keep busy", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=60) as long:
            assert long.status_code == 200
            lines = long.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # it is generating
            busy = next(r["index"] for r in replicas(gw) if r["running"] == 1)
            before = decisions(gw, "least_loaded")
            for i in range(4):
                complete(gw, f"short {i}")
            after = decisions(gw, "least_loaded")
            assert after[busy] == before[busy]
            assert after[1 - busy] == before[1 - busy] + 4


def test_prefix_routing_keeps_a_shared_prefix_together(mesh: Mesh) -> None:
    system = "You are a careful assistant who answers in one short sentence. " * 6
    other = "Translate the following text into French, keeping the formatting intact. " * 6
    with gateway(mesh, "prefix") as gw:
        complete(gw, system + "Question 0?")
        home = decisions(gw, "prefix").index(1)
        for i in range(1, 6):
            complete(gw, system + f"Question {i}?")
        assert decisions(gw, "prefix")[home] == 6
        assert metric(gw, 'stagemesh_prefix_hits_total{policy="prefix"}') == 5
        complete(gw, other + "Hello.")  # a new long prefix goes to the replica with fewer
        assert decisions(gw, "prefix")[1 - home] == 1
        complete(gw, other + "Goodbye.")
        complete(gw, system + "Question 6?")
        assert decisions(gw, "prefix") == ([7, 2] if home == 0 else [2, 7])
        assert metric(gw, 'stagemesh_prefix_hit_tokens_total{policy="prefix"}') > 0

        # The replicas' own prefix caches agree: the shared prefix was computed once, on `home`.
        def stage_hits() -> list[int]:
            return [r["stage_prefix_hit_tokens"] or 0 for r in replicas(gw)]

        wait_for(lambda: stage_hits()[home] >= 5 * 64, timeout_s=5)  # 6 x >= 4 blocks of 16 reused


def test_killed_replica_fails_no_request_and_comes_back(mesh: Mesh) -> None:
    with gateway(mesh, "round_robin", health_interval_s=0.2) as gw:
        outcomes: list[dict[str, Any]] = []
        lock = threading.Lock()

        def stream(i: int) -> None:
            body = {"prompt": f"request {i}", "max_tokens": 300, "ignore_eos": True, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
            with httpx.stream("POST", f"{gw.url}/v1/completions", json=body, timeout=120) as response:
                events, done = read_events(response) if response.status_code == 200 else ([], False)
            texts = [e["choices"][0]["text"] for e in events if e.get("choices")]
            with lock:
                outcomes.append({
                    "status": response.status_code,
                    "error": next((e["error"] for e in events if "error" in e), None),
                    "had_token": any(texts),
                    "completion_tokens": (events[-1].get("usage") or {}).get("completion_tokens") if events else None,
                    "done": done,
                })  # fmt: skip

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        wait_for(lambda: all(r["running"] >= 2 for r in replicas(gw)), timeout_s=60, interval_s=0.05)
        kill_stage(mesh, 1)
        for t in threads:
            t.join(timeout=120)
        assert len(outcomes) == 8
        for o in outcomes:
            # The contract: a request that had shown no token never fails. With migration (on by
            # default) the others continue on the live replica too, so none fails at all.
            assert o["status"] == 200 and o["done"]
            assert o["error"] is None or o["had_token"], o
            assert o["error"] is None and o["completion_tokens"] == 300, o
        assert metric(gw, "stagemesh_request_retries_total") >= 1
        wait_for(lambda: [r["healthy"] for r in replicas(gw)] == [True, False], timeout_s=10)
        health = httpx.get(f"{gw.url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["replicas"][1]["last_error"]
        for i in range(3):
            complete(gw, f"while down {i}")
        restart_stage(mesh, 1)
        wait_for(lambda: all(r["healthy"] for r in replicas(gw)), timeout_s=30, interval_s=0.1)
        before = decisions(gw, "round_robin")
        for i in range(4):
            complete(gw, f"after restart {i}")
        after = decisions(gw, "round_robin")
        assert after[1] > before[1]  # the restarted replica serves again
