"""Admission control: the per-replica gate, and 429 with Retry-After when the gateway is full."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from gateway.admission import ReplicaGate
from gateway.config import AdmissionLimits
from stagekit.errors import StageUnavailable
from tests.gateway.fake_stage import FakeStage
from tests.gateway.harness import GatewayThread


def test_gate_is_fifo_and_hands_slots_over() -> None:
    async def main() -> None:
        gate = ReplicaGate(max_running=1, max_waiting=2)
        await gate.acquire()
        order: list[str] = []

        async def wait(name: str) -> None:
            await gate.acquire()
            order.append(name)

        tasks = [asyncio.create_task(wait(n)) for n in "ab"]
        await asyncio.sleep(0)
        assert (gate.running, gate.waiting, gate.can_run_now, gate.can_queue) == (1, 2, False, False)
        gate.release()
        await asyncio.sleep(0)
        assert order == ["a"] and gate.running == 1  # the slot went straight to the oldest waiter
        gate.release()
        await asyncio.gather(*tasks)
        assert order == ["a", "b"]
        gate.release()
        assert (gate.running, gate.waiting) == (0, 0)

    asyncio.run(main())


def test_gate_cancelled_and_failed_waiters() -> None:
    async def main() -> None:
        gate = ReplicaGate(max_running=1, max_waiting=4)
        await gate.acquire()
        leaving = asyncio.create_task(gate.acquire())
        failing = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        leaving.cancel()
        await asyncio.sleep(0)
        assert gate.waiting == 1
        gate.fail_waiters(StageUnavailable("replica down"))
        with pytest.raises(StageUnavailable):
            await failing
        gate.release()
        assert (gate.running, gate.waiting) == (0, 0)

    asyncio.run(main())


def test_overload_is_429_with_retry_after_and_quick(replica: list[str], head: FakeStage) -> None:
    head.token_delay_s = 0.05
    limits = AdmissionLimits(max_running_per_replica=1, max_waiting_per_replica=1, max_waiting_total=1)
    with GatewayThread([replica], admission=limits) as gw:
        body = {"prompt": "Hello", "max_tokens": 20, "ignore_eos": True}

        def post() -> tuple[int, float, httpx.Response]:
            start = time.monotonic()
            r = httpx.post(f"{gw.url}/v1/completions", json=body, timeout=30)
            return r.status_code, time.monotonic() - start, r

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: post(), range(6)))
        codes = sorted(code for code, _, _ in results)
        assert codes == [200, 200, 429, 429, 429, 429], codes
        for code, elapsed, response in results:
            if code == 429:
                assert elapsed < 2.0  # refused at once, not queued behind 20-token requests
                assert response.headers["retry-after"] == "1"
                assert response.json()["error"]["type"] == "rate_limit_error"
                assert "capacity" in response.json()["error"]["message"]
        assert httpx.get(f"{gw.url}/health").status_code == 200
        assert httpx.post(f"{gw.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200
        metrics = httpx.get(f"{gw.url}/metrics").text
        assert 'stagemesh_requests_total{endpoint="/v1/completions",status="429"} 4.0' in metrics
