"""Several replicas: wiring, round robin, health, failover, startup waits (for the first replica only: the
others join when they come up); aborts on disconnect."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest

from tests.gateway.fake_stage import FakeStage, StageHost
from tests.gateway.harness import GatewayThread, wait_for


@pytest.fixture()
def two_replicas(stage_host: StageHost) -> Iterator[list[list[str]]]:
    replicas = [stage_host.start_replica(2), stage_host.start_replica(1)]
    yield replicas
    for address in [a for r in replicas for a in r]:
        if address in stage_host._servers:
            stage_host.stop(address)


def complete(url: str, **body: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2, **body}, timeout=10)


def test_wiring_and_round_robin(stage_host: StageHost, two_replicas: list[list[str]]) -> None:
    with GatewayThread(two_replicas) as gw:
        for replica in two_replicas:
            for i, address in enumerate(replica):
                assert stage_host.stages[address].pipeline == replica
                assert stage_host.stages[address].index == i
        for _ in range(4):
            assert complete(gw.url).status_code == 200
        heads = [stage_host.stages[r[0]] for r in two_replicas]
        assert [len(h.generate_calls) for h in heads] == [2, 2]
        health = httpx.get(f"{gw.url}/health").json()
        assert health["status"] == "ok"
        assert [r["addresses"] for r in health["replicas"]] == two_replicas
        assert all(r["healthy"] for r in health["replicas"])


def test_failover_and_health(stage_host: StageHost, two_replicas: list[list[str]]) -> None:
    with GatewayThread(two_replicas) as gw:
        stage_host.stop(two_replicas[1][0])
        # Requests keep succeeding: the dead replica is retried elsewhere, then taken out.
        for _ in range(4):
            assert complete(gw.url).status_code == 200
        health = httpx.get(f"{gw.url}/health").json()
        assert [r["healthy"] for r in health["replicas"]] == [True, False]
        assert health["replicas"][1]["last_error"]
        # UNAVAILABLE from the last replica is a 503, and /health says so too.
        stage_host.stop(two_replicas[0][1])
        wait_for(lambda: httpx.get(f"{gw.url}/health").status_code == 503)
        response = complete(gw.url)
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "service_unavailable"


def test_unavailable_head_is_retried_on_another_replica(stage_host: StageHost, two_replicas: list[list[str]]) -> None:
    heads = [stage_host.stages[r[0]] for r in two_replicas]
    with GatewayThread(two_replicas, health_interval_s=0.1) as gw:
        heads[0].fail_next = (grpc.StatusCode.UNAVAILABLE, "going down")
        heads[1].fail_next = None
        assert complete(gw.url).status_code == 200
        assert complete(gw.url).status_code == 200
        assert len(heads[1].generate_calls) >= 1
        # The failed replica answers probes, so it comes back.
        wait_for(lambda: all(r["healthy"] for r in httpx.get(f"{gw.url}/health").json()["replicas"]))


def test_startup_waits_for_late_stages(stage_host: StageHost) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = GatewayThread([[f"127.0.0.1:{port}"]]).start(wait=False)
    try:
        time.sleep(0.4)
        assert not gw.server.started
        address = stage_host.start(FakeStage(), port=port)
        gw.wait_started()
        assert complete(gw.url).status_code == 200
    finally:
        gw.stop()
        stage_host.stop(address)


def test_serves_with_a_replica_down_and_adds_it_when_it_comes_up(stage_host: StageHost) -> None:
    up = stage_host.start_replica(2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    late = f"127.0.0.1:{port}"
    started = time.monotonic()
    gw = GatewayThread([up, [late]], startup_timeout_s=30).start(timeout_s=10)
    late_stage = FakeStage()
    try:
        assert time.monotonic() - started < 5  # not the 30 s start-up timeout
        response = httpx.get(f"{gw.url}/health")
        assert response.status_code == 200
        missing = response.json()["replicas"][1]
        assert (missing["healthy"], missing["state"]) == (False, "joining")
        assert late in missing["last_error"]  # which stage, and why
        head = stage_host.stages[up[0]]
        before = len(head.generate_calls)
        assert [complete(gw.url).status_code for _ in range(3)] == [200] * 3
        assert len(head.generate_calls) == before + 3

        stage_host.start(late_stage, port=port)
        wait_for(lambda: httpx.get(f"{gw.url}/health").json()["replicas"][1]["state"] == "serving")
        assert (late_stage.pipeline, late_stage.index) == ([late], 0)  # wired by the health loop
        assert [complete(gw.url).status_code for _ in range(4)] == [200] * 4
        assert len(late_stage.generate_calls) == 2  # round robin: half of them
    finally:
        gw.stop()
        for address in [*up, late]:
            if address in stage_host._servers:
                stage_host.stop(address)


def test_startup_gives_up_without_stages() -> None:
    gw = GatewayThread([["127.0.0.1:9"]], startup_timeout_s=0.3)
    gw.start(wait=False)
    with pytest.raises(RuntimeError, match="exited during startup"):
        gw.wait_started(timeout_s=5)
    assert gw.startup_failed
    gw.stop()


def test_api_key(replica: list[str]) -> None:
    with GatewayThread([replica], api_key="sesame") as gw:
        response = complete(gw.url)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        ok = httpx.post(
            f"{gw.url}/v1/completions",
            json={"prompt": "Hello", "max_tokens": 2},
            headers={"Authorization": "Bearer sesame"},
        )
        assert ok.status_code == 200
        assert httpx.get(f"{gw.url}/health").status_code == 200


def test_stream_disconnect_aborts_the_stage_request(gateway: GatewayThread, head: FakeStage) -> None:
    head.token_delay_s = 0.05
    body = {"prompt": "Hello", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=10) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
    request_id = first.split('"id":"')[1].split('"')[0] + "-0"
    wait_for(lambda: request_id in head.aborted and request_id in head.cancelled)


def test_non_stream_disconnect_aborts_the_stage_request(gateway: GatewayThread, head: FakeStage) -> None:
    head.token_delay_s = 0.05
    calls = len(head.generate_calls)
    body = {"prompt": "Hi", "max_tokens": 100, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=0.3)
    wait_for(lambda: len(head.generate_calls) > calls)
    request_id = head.generate_calls[calls].request_id
    wait_for(lambda: request_id in head.aborted)


def test_metrics(gateway: GatewayThread) -> None:
    assert complete(gateway.url).status_code == 200
    text = httpx.get(f"{gateway.url}/metrics").text
    assert 'stagemesh_requests_total{endpoint="/v1/completions",status="200"}' in text
    for name in (
        "stagemesh_prompt_tokens_total",
        "stagemesh_generation_tokens_total",
        "stagemesh_time_to_first_token_seconds_bucket",
        "stagemesh_e2e_request_latency_seconds_count",
        'stagemesh_replica_healthy{replica="0"} 1.0',
    ):
        assert name in text


def test_concurrent_requests(gateway: GatewayThread) -> None:
    results: list[int] = []

    def one() -> None:
        results.append(complete(gateway.url, max_tokens=8).status_code)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 16
