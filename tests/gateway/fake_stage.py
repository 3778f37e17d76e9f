"""A deterministic fake of the Stage gRPC service, for gateway tests only (never imported by product code).

Every fake stage runs on one background event loop (`StageHost`), so tests stay synchronous.
The head "generates" the token ids of `SCRIPT` in order (greedy), from a seeded offset (sampled),
then EOS; logprobs are a simple function of the position, so tests can predict every field. A
sampled token depends only on (seed, output position) as on a real stage: a call with
``seed_offset`` k continues the script where an uninterrupted call would be at its k-th token.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from stagekit.rpc.pb import common_pb2, stage_pb2, stage_pb2_grpc
from stagekit.tokenizer import Tokenizer
from tests.gateway.tokenizer_files import tokenizer_files

SCRIPT = "Once upon a time, a quick brown fox jumped over the lazy dog. The end."
MODEL_NAME = "fake-model"
MAX_MODEL_LEN = 128
T = TypeVar("T")


def tokenizer() -> Tokenizer:
    return Tokenizer.from_files(tokenizer_files())


def script_ids() -> list[int]:
    return tokenizer().encode(SCRIPT, add_special_tokens=False)


def logprob_at(position: int) -> float:
    return -0.5 - 0.01 * position


@dataclass
class FakeStage(stage_pb2_grpc.StageServicer):
    """One stage; only the stage wired as index 0 answers Generate."""

    files: dict[str, bytes] = field(default_factory=tokenizer_files)
    token_delay_s: float = 0.0
    tokens_per_response: int = 2
    fail_next: tuple[grpc.StatusCode, str] | None = None
    # (k, code, message): the next request fails with ``code`` once it streamed k tokens
    fail_after: tuple[int, grpc.StatusCode, str] | None = None
    pipeline: list[str] = field(default_factory=list)
    index: int = -1
    # data-parallel attention: the group this stage reports; dp_state "forming" also fails its
    # requests in flight with UNAVAILABLE (what a member does when its group breaks)
    dp_group: str = ""
    dp_rank: int = 0
    dp_size: int = 0
    dp_state: str = ""
    dp_detail: str = ""
    layers: tuple[int, int] = (0, 0)  # the layer range it reports (start, end)
    generate_calls: list[stage_pb2.GenerateRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    wire_calls: int = 0

    def __post_init__(self) -> None:
        tok = Tokenizer.from_files(self.files)
        self.vocab_size = tok.vocab_size
        self.eos_token_id = tok.eos_token_ids[0]
        self.script = tok.encode(SCRIPT, add_special_tokens=False)

    def _info(self) -> stage_pb2.StageInfo:
        return stage_pb2.StageInfo(
            model_name=MODEL_NAME,
            architecture="FakeForCausalLM",
            num_layers=2,
            start_layer=self.layers[0],
            end_layer=self.layers[1],
            tp_size=1,
            vocab_size=self.vocab_size,
            max_model_len=MAX_MODEL_LEN,
            is_first=self.index == 0,
            eos_token_ids=[self.eos_token_id],
            wired=self.index >= 0,
            transport="grpc",
            dp_group=self.dp_group,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            dp_state=self.dp_state,
            dp_detail=self.dp_detail,
        )

    async def GetInfo(self, request: Any, context: grpc.aio.ServicerContext) -> stage_pb2.StageInfo:
        return self._info()

    async def GetTokenizer(self, request: Any, context: grpc.aio.ServicerContext) -> stage_pb2.TokenizerFiles:
        return stage_pb2.TokenizerFiles(
            files=[stage_pb2.TokenizerFile(name=k, content=v) for k, v in self.files.items()]
        )

    async def Wire(self, request: stage_pb2.WireRequest, context: grpc.aio.ServicerContext) -> Any:
        self.pipeline, self.index = list(request.pipeline), request.index
        self.wire_calls += 1
        return stage_pb2.WireResponse(info=self._info())

    async def Abort(self, request: stage_pb2.AbortRequest, context: grpc.aio.ServicerContext) -> Any:
        self.aborted.append(request.request_id)
        return stage_pb2.AbortResponse(found=True)

    def _token(self, sampling: common_pb2.SamplingParams, k: int, offset: int) -> tuple[int, bool]:
        """The k-th token and whether it ends the request with STOP."""
        eos_allowed = not sampling.ignore_eos and k >= sampling.min_tokens
        if k >= len(self.script) and eos_allowed:
            return self.eos_token_id, True
        token = self.script[(offset + k) % len(self.script)]
        return token, token in sampling.stop_token_ids

    async def Generate(
        self, request: stage_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stage_pb2.GenerateResponse]:
        self.generate_calls.append(request)
        if self.index != 0:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not the replica head")
        if self.fail_next is not None:
            (code, message), self.fail_next = self.fail_next, None
            await context.abort(code, message)
        sampling, rid = request.sampling, request.request_id
        offset = 0
        if sampling.temperature > 0:
            rng = random.Random(sampling.seed if sampling.HasField("seed") else None)
            offset = rng.randrange(len(self.script)) + sampling.seed_offset
        out = stage_pb2.GenerateResponse(request_id=rid)
        try:
            for k in range(sampling.max_tokens):
                if self.dp_state == "forming":
                    broke = f"DP group {self.dp_group} broke: {self.dp_detail}"
                    await context.abort(grpc.StatusCode.UNAVAILABLE, broke)
                if rid in self.aborted:
                    yield stage_pb2.GenerateResponse(
                        request_id=rid, finish_reason=common_pb2.FINISH_REASON_ABORT, completion_tokens=k
                    )
                    return
                if self.fail_after is not None and k >= self.fail_after[0]:
                    if out.token_ids:
                        yield out
                    (_, code, message), self.fail_after = self.fail_after, None
                    await context.abort(code, message)
                token, stop = self._token(sampling, k, offset)
                out.token_ids.append(token)
                out.logprobs.append(logprob_at(k))
                tops = [(token + j) % self.vocab_size for j in range(sampling.top_logprobs)]
                # From the third alternative on, -inf: what a stage reports for masked tokens.
                top_lps = [logprob_at(k) - j if j < 2 else float("-inf") for j in range(len(tops))]
                out.top_logprobs.add().top.extend(map(top_logprob, tops, top_lps))
                last = stop or k + 1 == sampling.max_tokens
                if last:
                    out.finish_reason = common_pb2.FINISH_REASON_STOP if stop else common_pb2.FINISH_REASON_LENGTH
                    out.prompt_tokens = len(request.prompt_token_ids)
                    out.completion_tokens = k + 1
                if last or len(out.token_ids) >= self.tokens_per_response:
                    if self.token_delay_s:
                        await asyncio.sleep(self.token_delay_s)
                    yield out
                    out = stage_pb2.GenerateResponse(request_id=rid)
                if last:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            # a cancellation that lands while this generator waits at a yield (its response being
            # written) closes it with GeneratorExit instead of raising CancelledError in it
            self.cancelled.append(rid)
            raise


def top_logprob(token_id: int, logprob: float) -> stage_pb2.TopLogprob:
    return stage_pb2.TopLogprob(token_id=token_id, logprob=logprob)


class StageHost:
    """A background event loop hosting fake stage servers on 127.0.0.1, each on its own port."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-stages", daemon=True)
        self._thread.start()
        self._servers: dict[str, grpc.aio.Server] = {}
        self.stages: dict[str, FakeStage] = {}

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def start(self, stage: FakeStage | None = None, port: int = 0) -> str:
        """Serve ``stage`` (a new one by default); its address."""
        stage = stage or FakeStage()

        async def up() -> str:
            server = grpc.aio.server()
            stage_pb2_grpc.add_StageServicer_to_server(stage, server)
            bound = server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            address = f"127.0.0.1:{bound}"
            self._servers[address] = server
            return address

        address = self.call(up())
        self.stages[address] = stage
        return address

    def start_replica(self, num_stages: int = 2) -> list[str]:
        return [self.start() for _ in range(num_stages)]

    def stop(self, address: str) -> None:
        server = self._servers.pop(address)
        self.call(server.stop(grace=None))

    def close(self) -> None:
        for address in list(self._servers):
            self.stop(address)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()
