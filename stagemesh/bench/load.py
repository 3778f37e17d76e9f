"""Drive an OpenAI-compatible endpoint with N concurrent streaming completions and time
every token: output tokens/s, time to first token, inter-token latency."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestTiming:
    ttft_s: float
    itl_s: list[float]
    num_tokens: int
    end_s: float


@dataclass
class LoadResult:
    concurrency: int
    wall_s: float
    output_tokens: int
    timings: list[RequestTiming] = field(default_factory=list)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    def ttft(self, q: float) -> float:
        return _quantile([t.ttft_s for t in self.timings], q)

    def itl(self, q: float) -> float:
        return _quantile([x for t in self.timings for x in t.itl_s], q)


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(sorted(xs), n=100, method="inclusive")[max(0, min(98, int(q * 100) - 1))]


async def _one(client: httpx.AsyncClient, url: str, body: dict, t0: float) -> RequestTiming:
    start = time.perf_counter()
    stamps: list[float] = []
    usage_tokens = 0
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
            if chunk.get("usage"):
                usage_tokens = chunk["usage"]["completion_tokens"]
    itl = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return RequestTiming(stamps[0] - start if stamps else float("nan"), itl, usage_tokens, time.perf_counter() - t0)


async def run_load(base_url: str, model: str, prompts: list[list[int]], output_len: int) -> LoadResult:
    """All prompts at once (one client each), greedy, exactly ``output_len`` tokens each."""
    url = f"{base_url}/v1/completions"
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        bodies = [{"model": model, "prompt": p, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
                   "stream": True, "stream_options": {"include_usage": True}} for p in prompts]
        timings = await asyncio.gather(*[_one(client, url, b, t0) for b in bodies])
        wall = time.perf_counter() - t0
    return LoadResult(len(prompts), wall, sum(t.num_tokens for t in timings), list(timings))
