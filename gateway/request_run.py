"""`RequestRun`: one HTTP request's choices in flight, with its id, timing, metrics and log line."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from fastapi import Request

from gateway.errors import ModelNotFound, face_of
from gateway.fanout import ChoiceResult, merge
from gateway.generation import ChoiceDelta, ChoiceJob, generate_choice
from gateway.sampling import for_choice
from gateway.state import GatewayState
from stagekit.errors import StagemeshError
from stagekit.types.sampling_params import SamplingParams

logger = logging.getLogger("stagemesh.gateway")


class ClientDisconnected(Exception):
    """The HTTP client went away before its response was ready."""


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(requested: str | None, state: GatewayState) -> None:
    if requested is not None and requested != state.model_name:
        raise ModelNotFound(
            f"The model '{requested}' does not exist (this gateway serves '{state.model_name}').",
            param="model",
        )


def make_jobs(
    request_id: str,
    prompts: Sequence[Sequence[int]],
    samplings: Sequence[SamplingParams],
    n: int,
    stop: tuple[str, ...],
) -> list[ChoiceJob]:
    """``n`` choices per prompt, indexed prompt-major as OpenAI does."""
    jobs = []
    for p, (prompt, sampling) in enumerate(zip(prompts, samplings, strict=True)):
        for j in range(n):
            index = p * n + j
            jobs.append(ChoiceJob(index, f"{request_id}-{index}", tuple(prompt), for_choice(sampling, j), stop))
    return jobs


class RequestRun:
    """Runs the jobs of one request and accounts for them exactly once (``finish``). ``seed``
    is the request's (sent or chosen by the gateway), which its response reports."""

    def __init__(
        self, state: GatewayState, endpoint: str, request_id: str, jobs: list[ChoiceJob], prompt_tokens: int,
        seed: int,
    ) -> None:
        self.state = state
        self.seed = seed
        self.endpoint = endpoint
        self.request_id = request_id
        self.jobs = jobs
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.created = int(time.time())
        self._start = time.monotonic()
        self._first_token_at: float | None = None
        self._finished = False
        state.metrics.running.inc()
        state.metrics.prompt_tokens.inc(prompt_tokens)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    async def deltas(self) -> AsyncIterator[ChoiceDelta]:
        state = self.state
        migrate = state.config.migrate
        streams = [generate_choice(state.pool, state.tokenizer, job, migrate=migrate) for job in self.jobs]
        last_output: dict[int, float] = {}
        async with aclosing(merge(streams)) as merged:
            async for delta in merged:
                if delta.tokens:
                    now = time.monotonic()
                    if self._first_token_at is None:
                        self._first_token_at = now
                        state.metrics.time_to_first_token.observe(now - self._start)
                    previous = last_output.get(delta.index)
                    if previous is not None:
                        gap = (now - previous) / len(delta.tokens)
                        for _ in delta.tokens:
                            state.metrics.inter_token_latency.observe(gap)
                    last_output[delta.index] = now
                if delta.finish_reason is not None:
                    self.completion_tokens += delta.completion_tokens
                yield delta

    async def collect(self, request: Request | None = None) -> list[ChoiceResult]:
        """Every choice to its end; gives up (aborting the stage requests) if the client leaves."""
        results = {job.index: ChoiceResult(job.index) for job in self.jobs}

        async def consume() -> None:
            async with aclosing(self.deltas()) as deltas:
                async for delta in deltas:
                    results[delta.index].add(delta)

        task = asyncio.ensure_future(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.5)
                if done:
                    task.result()
                    return [results[i] for i in sorted(results)]
                if request is not None and await request.is_disconnected():
                    raise ClientDisconnected(self.request_id)
        finally:
            task.cancel()

    def finish(self, outcome: str | BaseException) -> None:
        if self._finished:
            return
        self._finished = True
        elapsed = time.monotonic() - self._start
        metrics = self.state.metrics
        metrics.running.dec()
        metrics.generation_tokens.inc(self.completion_tokens)
        if isinstance(outcome, StagemeshError):
            outcome = f"error {face_of(outcome).status_code} {outcome}"
        elif isinstance(outcome, ClientDisconnected):
            outcome = "client disconnected"
        elif isinstance(outcome, BaseException):
            outcome = f"failed {type(outcome).__name__}: {outcome}"
        if outcome == "ok":
            metrics.e2e_latency.observe(elapsed)
        ttft = f"{self._first_token_at - self._start:.3f}s" if self._first_token_at else "-"
        logger.info(
            "%s %s %s choices=%d prompt_tokens=%d completion_tokens=%d ttft=%s e2e=%.3fs",
            self.request_id,
            self.endpoint,
            outcome,
            len(self.jobs),
            self.prompt_tokens,
            self.completion_tokens,
            ttft,
            elapsed,
        )
