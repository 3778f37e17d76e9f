"""Protobuf <-> gateway types for the Generation API (requests become the REST API's models)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from gateway.fanout import ChoiceResult
from gateway.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from gateway.textstream import TokenOutput
from stagekit.errors import InvalidRequest
from stagekit.rpc.pb import common_pb2, generation_pb2

_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}


def _optional(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


def _sampling_fields(p: generation_pb2.GenerationParams) -> dict[str, Any]:
    return {
        "temperature": _optional(p, "temperature"),
        "top_p": _optional(p, "top_p"),
        "top_k": _optional(p, "top_k"),
        "seed": _optional(p, "seed"),
        "min_tokens": p.min_tokens,
        "stop": list(p.stop) or None,
        "stop_token_ids": list(p.stop_token_ids) or None,
        "ignore_eos": p.ignore_eos,
        "n": p.n or 1,
    }


def request_from_proto(msg: generation_pb2.GenerationRequest) -> tuple[CompletionRequest | ChatCompletionRequest, bool]:
    """The REST request this gRPC request means, and whether it asked for log-probabilities."""
    p = msg.params
    fields = _sampling_fields(p)
    fields["model"] = msg.model or None
    num_top = _optional(p, "logprobs")
    kind = msg.WhichOneof("prompt")
    try:
        if kind == "chat":
            messages = [ChatMessage(role=m.role, content=m.content) for m in msg.chat.messages]
            chat = ChatCompletionRequest(
                messages=messages,
                max_tokens=_optional(p, "max_tokens"),
                logprobs=num_top is not None,
                top_logprobs=num_top,
                **fields,
            )
            return chat, num_top is not None
        if kind == "text":
            prompt: Any = msg.text
        elif kind == "token_ids":
            prompt = list(msg.token_ids.ids)
        else:
            raise InvalidRequest("The request has no prompt: set text, token_ids or chat.", param="prompt")
        max_tokens = _optional(p, "max_tokens")
        completion = CompletionRequest(
            prompt=prompt,
            max_tokens=16 if max_tokens is None else max_tokens,
            logprobs=num_top,
            **fields,
        )
    except ValidationError as err:
        first = err.errors()[0]
        raise InvalidRequest(f"Invalid request: {first.get('msg', 'invalid value')}.") from err
    return completion, num_top is not None


def _token_fields(tokens: Sequence[TokenOutput], with_logprobs: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"token_ids": [t.token_id for t in tokens]}
    if with_logprobs:
        out["logprobs"] = [t.logprob if t.logprob is not None else float("nan") for t in tokens]
        out["top_logprobs"] = [
            generation_pb2.TopLogprobs(token_ids=[e.token_id for e in t.top], logprobs=[e.logprob for e in t.top])
            for t in tokens
        ]
    return out


def chunk_to_proto(
    request_id: str,
    seed: int,
    index: int,
    text: str,
    tokens: Sequence[TokenOutput],
    finish_reason: str | None,
    with_logprobs: bool,
) -> generation_pb2.GenerationChunk:
    return generation_pb2.GenerationChunk(
        request_id=request_id,
        seed=seed,
        index=index,
        text=text,
        finish_reason=_FINISH.get(finish_reason or "", common_pb2.FINISH_REASON_UNSPECIFIED),
        **_token_fields(tokens, with_logprobs),
    )


def usage_to_proto(usage: dict[str, int]) -> generation_pb2.Usage:
    return generation_pb2.Usage(**usage)


def usage_chunk(request_id: str, seed: int, usage: dict[str, int]) -> generation_pb2.GenerationChunk:
    return generation_pb2.GenerationChunk(request_id=request_id, seed=seed, usage=usage_to_proto(usage))


def complete_response(
    request_id: str,
    seed: int,
    model: str,
    results: Sequence[ChoiceResult],
    usage: dict[str, int],
    with_logprobs: bool,
) -> generation_pb2.CompleteResponse:
    choices = [
        generation_pb2.CompletionChoice(
            index=r.index,
            text=r.text,
            finish_reason=_FINISH.get(r.finish_reason or "", common_pb2.FINISH_REASON_UNSPECIFIED),
            **_token_fields(r.tokens, with_logprobs),
        )
        for r in results
    ]
    return generation_pb2.CompleteResponse(
        request_id=request_id, seed=seed, model=model, choices=choices, usage=usage_to_proto(usage)
    )


def models_response(cards: Sequence[dict[str, Any]]) -> generation_pb2.ListModelsResponse:
    return generation_pb2.ListModelsResponse(
        models=[
            generation_pb2.ModelCard(
                id=c["id"], max_model_len=c["max_model_len"], owned_by=c["owned_by"], created=c["created"]
            )
            for c in cards
        ]
    )
