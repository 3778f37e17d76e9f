"""``POST /v1/chat/completions``: messages rendered by the model's chat template."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from gateway.fanout import ChoiceResult
from gateway.generation import ChoiceDelta
from gateway.logprobs import chat_logprobs
from gateway.prompts import chat_prompt
from gateway.request_run import RequestRun, check_model, make_jobs, new_request_id
from gateway.sampling import MAX_TOP_LOGPROBS, build_sampling, check_sampling_fields, request_seed, stop_strings
from gateway.schemas import ChatCompletionRequest
from gateway.state import GatewayState
from gateway.streaming import sse_response, start_stream
from stagekit.errors import InvalidRequest


def _check_unsupported(req: ChatCompletionRequest) -> int | None:
    """Rejects what we cannot serve; returns the number of top log-probs (None: no logprobs)."""
    if req.tools:
        raise InvalidRequest("'tools' are not supported.", param="tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise InvalidRequest("Only the 'text' response_format is supported.", param="response_format")
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise InvalidRequest("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(
                f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {req.top_logprobs}.",
                param="top_logprobs",
            )
    return (req.top_logprobs or 0) if req.logprobs else None


async def prepare_chat(
    req: ChatCompletionRequest, state: GatewayState, endpoint: str = "/v1/chat/completions"
) -> tuple[RequestRun, int | None]:
    """Check a chat request and turn it into choices; also the number of top log-probs (None: off).
    The template is rendered and tokenized on the worker pool."""
    check_model(req.model, state)
    num_top = _check_unsupported(req)
    check_sampling_fields(req, state.vocab_size)
    prompt = await state.offload(chat_prompt, req.messages, state.tokenizer, state.vocab_size, state.max_prompt_chars)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    seed = request_seed(req)
    sampling = build_sampling(
        req,
        seed=seed,
        max_tokens=max_tokens,
        prompt_len=len(prompt),
        max_model_len=state.max_model_len,
        vocab_size=state.vocab_size,
        top_logprobs=num_top or 0,
        limits=state.config.limits,
        eos_token_ids=state.head_info.eos_token_ids,
    )
    request_id = new_request_id("chatcmpl")
    jobs = make_jobs(request_id, [prompt], [sampling], req.n, stop_strings(req.stop))
    return RequestRun(state, endpoint, request_id, jobs, len(prompt), seed), num_top


async def create_chat_completion(req: ChatCompletionRequest, request: Request, state: GatewayState) -> Response:
    run, num_top = await prepare_chat(req, state)
    try:
        if req.stream:
            return await _stream(req, run, state, num_top)
        results = await run.collect(request)
    except BaseException as err:
        run.finish(err)
        raise
    run.finish("ok")
    return JSONResponse(_response(run, state, results, num_top))


def _response(run: RequestRun, state: GatewayState, results: list[ChoiceResult], num_top: int | None) -> dict[str, Any]:
    choices = [
        {
            "index": r.index,
            "message": {"role": "assistant", "content": r.text},
            "logprobs": None if num_top is None else chat_logprobs(r.tokens, state.tokenizer, num_top),
            "finish_reason": r.finish_reason,
        }
        for r in results
    ]
    return {
        "id": run.request_id,
        "object": "chat.completion",
        "created": run.created,
        "model": state.model_name,
        "seed": run.seed,
        "choices": choices,
        "usage": run.usage(),
    }


async def _stream(req: ChatCompletionRequest, run: RequestRun, state: GatewayState, num_top: int | None) -> Response:
    first, deltas = await start_stream(run)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": run.request_id,
            "object": "chat.completion.chunk",
            "created": run.created,
            "model": state.model_name,
            "seed": run.seed,
            "choices": choices,
        }
        if include_usage:
            out["usage"] = None
        return out

    def render(delta: ChoiceDelta) -> dict[str, Any] | None:
        if not delta.text and delta.finish_reason is None and (num_top is None or not delta.tokens):
            return None
        choice: dict[str, Any] = {
            "index": delta.index,
            "delta": {"content": delta.text} if delta.text else {},
            "logprobs": None if num_top is None else chat_logprobs(delta.tokens, state.tokenizer, num_top),
            "finish_reason": delta.finish_reason,
        }
        return chunk([choice])

    head = [
        chunk(
            [
                {
                    "index": job.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
        for job in run.jobs
    ]

    def tail() -> list[dict[str, Any]]:
        return [{**chunk([]), "usage": run.usage()}] if include_usage else []

    return sse_response(run, first, deltas, render=render, head=head, tail=tail)
