"""``POST /v1/completions``: legacy text completions, batched prompts and token-id prompts."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from gateway.fanout import ChoiceResult
from gateway.generation import ChoiceDelta
from gateway.logprobs import completion_logprobs
from gateway.prompts import completion_prompts
from gateway.request_run import RequestRun, check_model, make_jobs, new_request_id
from gateway.sampling import MAX_TOP_LOGPROBS, build_sampling, check_sampling_fields, request_seed, stop_strings
from gateway.schemas import CompletionRequest
from gateway.state import GatewayState
from gateway.streaming import sse_response, start_stream
from stagekit.errors import InvalidRequest


def _check_unsupported(req: CompletionRequest) -> None:
    if req.echo:
        raise InvalidRequest("'echo' is not supported.", param="echo")
    if req.suffix:
        raise InvalidRequest("'suffix' is not supported.", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise InvalidRequest("'best_of' other than 'n' is not supported.", param="best_of")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(
            f"'logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {req.logprobs}.", param="logprobs"
        )


async def prepare_completion(
    req: CompletionRequest, state: GatewayState, endpoint: str = "/v1/completions"
) -> RequestRun:
    """Check a completions request and turn it into choices to run (no stage sees it before);
    the prompts are tokenized on the worker pool."""
    check_model(req.model, state)
    _check_unsupported(req)
    check_sampling_fields(req, state.vocab_size)
    prompts = await state.offload(
        completion_prompts, req.prompt, state.tokenizer, state.vocab_size, state.max_prompt_chars
    )
    num_top = req.logprobs or 0
    seed = request_seed(req)
    samplings = [
        build_sampling(
            req,
            seed=seed,
            max_tokens=req.max_tokens,
            prompt_len=len(ids),
            max_model_len=state.max_model_len,
            vocab_size=state.vocab_size,
            top_logprobs=num_top,
            limits=state.config.limits,
            eos_token_ids=state.head_info.eos_token_ids,
        )
        for ids in prompts
    ]
    request_id = new_request_id("cmpl")
    jobs = make_jobs(request_id, prompts, samplings, req.n, stop_strings(req.stop))
    return RequestRun(state, endpoint, request_id, jobs, sum(len(p) for p in prompts), seed)


async def create_completion(req: CompletionRequest, request: Request, state: GatewayState) -> Response:
    run = await prepare_completion(req, state)
    try:
        if req.stream:
            return await _stream(req, run, state)
        results = await run.collect(request)
    except BaseException as err:
        run.finish(err)
        raise
    run.finish("ok")
    return JSONResponse(_response(req, run, state, results))


def _response(
    req: CompletionRequest, run: RequestRun, state: GatewayState, results: list[ChoiceResult]
) -> dict[str, Any]:
    choices = [
        {
            "index": r.index,
            "text": r.text,
            "logprobs": None if req.logprobs is None else completion_logprobs(r.tokens, state.tokenizer, req.logprobs),
            "finish_reason": r.finish_reason,
        }
        for r in results
    ]
    return {
        "id": run.request_id,
        "object": "text_completion",
        "created": run.created,
        "model": state.model_name,
        "seed": run.seed,
        "choices": choices,
        "usage": run.usage(),
    }


async def _stream(req: CompletionRequest, run: RequestRun, state: GatewayState) -> Response:
    first, deltas = await start_stream(run)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": run.request_id,
            "object": "text_completion",
            "created": run.created,
            "model": state.model_name,
            "seed": run.seed,
            "choices": choices,
        }
        if include_usage:
            out["usage"] = None
        return out

    def render(delta: ChoiceDelta) -> dict[str, Any] | None:
        if not delta.text and delta.finish_reason is None and (req.logprobs is None or not delta.tokens):
            return None
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(delta.tokens, state.tokenizer, req.logprobs)
        return chunk(
            [
                {
                    "index": delta.index,
                    "text": delta.text,
                    "logprobs": logprobs,
                    "finish_reason": delta.finish_reason,
                }
            ]
        )

    def tail() -> list[dict[str, Any]]:
        if not include_usage:
            return []
        return [{**chunk([]), "usage": run.usage()}]

    return sse_response(run, first, deltas, render=render, tail=tail)
