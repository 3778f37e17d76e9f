"""Steady load for the chaos bench: a fixed set of request kinds (greedy and seeded sampling,
REST streaming and gRPC streaming), each with exactly one right answer, sent by a few workers
in turn; every answer is checked against the same kind's answer on the calm mesh."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import grpc
import httpx

from stagekit.client import GenerationClient
from stagekit.client.retry import NO_RETRY

PROMPTS = ["The mesh", "Once upon a time", "A stage restarts", "Replica one", "Supervision", "Chaos monkeys"]


@dataclass(frozen=True)
class Kind:
    """One request of the workload; sent again and again, it must give the same tokens every time
    (greedy, or sampled with a fixed seed): ``ignore_eos`` makes every answer ``max_tokens`` long."""

    prompt: str
    api: str  # "rest" (SSE) or "grpc" (Generation.Generate)
    seed: int | None  # None: greedy

    def sampling(self, max_tokens: int) -> dict:
        if self.seed is None:
            return {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
        return {"max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.9, "seed": self.seed, "ignore_eos": True}

    def label(self) -> str:
        return f"{self.api} {'greedy' if self.seed is None else f'seed={self.seed}'} {self.prompt!r}"


def kinds() -> list[Kind]:
    """Every prompt once per API; greedy and seeded alternate, so each API gets both."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        for j, api in enumerate(("rest", "grpc")):
            out.append(Kind(prompt, api, None if (i + j) % 2 == 0 else 1000 + i))
    return out


@dataclass
class Outcome:
    kind: Kind
    latency_s: float
    answer: str | None = None  # the text (REST), or the token ids and the text (gRPC); None when it failed
    error: str = ""
    request_id: str = ""  # the gateway's id (REST), to find the request in its log


class Sender:
    """One worker's connections: an HTTP client and a gRPC client without client-side retries, so
    every failure the gateway lets through is counted (a retrying client would hide it)."""

    def __init__(self, url: str, grpc_target: str, model: str, max_tokens: int, timeout_s: float) -> None:
        self.url, self.model, self.max_tokens, self.timeout_s = url, model, max_tokens, timeout_s
        self.http = httpx.Client(timeout=timeout_s)
        self.grpc = GenerationClient(grpc_target, timeout_s=timeout_s, retry=NO_RETRY)

    def close(self) -> None:
        self.http.close()
        self.grpc.close()

    def send(self, kind: Kind) -> Outcome:
        start = time.perf_counter()
        outcome = Outcome(kind, 0.0)
        try:
            outcome.answer = self._rest(kind, outcome) if kind.api == "rest" else self._grpc(kind)
        except Exception as e:  # whatever it was (HTTP, gRPC, an SDK error type), it is a failed request
            outcome.error = f"{type(e).__name__}: {_describe(e)}"
        outcome.latency_s = time.perf_counter() - start
        return outcome

    def _rest(self, kind: Kind, outcome: Outcome) -> str:
        body = {"model": self.model, "prompt": kind.prompt, "stream": True, **kind.sampling(self.max_tokens)}
        text, done = "", False
        with self.http.stream("POST", f"{self.url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode(errors='replace')[:300]}")
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[len("data: "):])
                    outcome.request_id = event.get("id", outcome.request_id)
                    if "error" in event:
                        raise RuntimeError(f"error event in the stream: {event['error']}")
                    text += "".join(c["text"] for c in event.get("choices", []))
        if not done:
            raise RuntimeError("the stream ended without [DONE]")
        return text

    def _grpc(self, kind: Kind) -> str:
        ids: list[int] = []
        text = ""
        for chunk in self.grpc.generate(kind.prompt, model=self.model, **kind.sampling(self.max_tokens)):
            ids += chunk.token_ids
            text += chunk.text
        return f"{','.join(map(str, ids))} {text!r}"  # the tokens, and the text the gateway made of them


def _describe(e: Exception) -> str:
    if isinstance(e, grpc.RpcError) and callable(getattr(e, "code", None)):
        return f"{e.code().name} {e.details()}"
    return str(e)[:300]


@dataclass
class Load:
    """The workers' shared state: request ``i`` is kind ``i % len(kinds)``; workers take the next
    ``i`` until `stop` is set or ``max_requests`` were sent (0: no limit)."""

    kinds: list[Kind]
    max_requests: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: list[Outcome] = field(default_factory=list)
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> Kind | None:
        with self._lock:
            if self.stop.is_set() or (self.max_requests and self._next >= self.max_requests):
                return None
            self._next += 1
            return self.kinds[(self._next - 1) % len(self.kinds)]

    def record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def work(self, sender: Sender) -> None:
        while (kind := self.take()) is not None:
            self.record(sender.send(kind))


def run_workers(load: Load, senders: list[Sender]) -> list[threading.Thread]:
    threads = [threading.Thread(target=load.work, args=(s,), daemon=True) for s in senders]
    for t in threads:
        t.start()
    return threads
