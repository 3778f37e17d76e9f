"""SDK types <-> Generation protobuf messages (the only SDK module that builds or reads them)."""

from __future__ import annotations

from stagekit.client.types import Choice, Chunk, Completion, GenerationRequest, Model, TopLogprob, Usage
from stagekit.rpc.pb import common_pb2, generation_pb2

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


def request_to_proto(req: GenerationRequest) -> generation_pb2.GenerationRequest:
    params = generation_pb2.GenerationParams(
        min_tokens=req.min_tokens,
        stop=list(req.stop),
        stop_token_ids=list(req.stop_token_ids),
        ignore_eos=req.ignore_eos,
        n=req.n,
    )
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs"):
        value = getattr(req, name)
        if value is not None:
            setattr(params, name, value)
    msg = generation_pb2.GenerationRequest(model=req.model or "", params=params)
    if req.messages is not None:
        msg.chat.messages.extend(generation_pb2.ChatMessage(role=r, content=c) for r, c in req.messages)
    elif isinstance(req.prompt, str):
        msg.text = req.prompt
    elif req.prompt is not None:
        msg.token_ids.ids.extend(req.prompt)
    return msg


def _tops(rows: list[generation_pb2.TopLogprobs]) -> tuple[tuple[TopLogprob, ...], ...]:
    return tuple(tuple(TopLogprob(t, lp) for t, lp in zip(r.token_ids, r.logprobs, strict=True)) for r in rows)


def usage_from_proto(msg: generation_pb2.Usage) -> Usage:
    return Usage(msg.prompt_tokens, msg.completion_tokens, msg.total_tokens)


def chunk_from_proto(msg: generation_pb2.GenerationChunk) -> Chunk:
    return Chunk(
        request_id=msg.request_id,
        index=msg.index,
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        logprobs=tuple(msg.logprobs),
        top_logprobs=_tops(list(msg.top_logprobs)),
        finish_reason=_FINISH.get(msg.finish_reason),
        seed=msg.seed if msg.HasField("seed") else None,
    )


def is_usage(msg: generation_pb2.GenerationChunk) -> bool:
    """The stream's final message, which carries only the usage."""
    return msg.HasField("usage")


def completion_from_proto(msg: generation_pb2.CompleteResponse) -> Completion:
    choices = tuple(
        Choice(
            index=c.index,
            text=c.text,
            token_ids=tuple(c.token_ids),
            logprobs=tuple(c.logprobs),
            top_logprobs=_tops(list(c.top_logprobs)),
            finish_reason=_FINISH.get(c.finish_reason),
        )
        for c in msg.choices
    )
    seed = msg.seed if msg.HasField("seed") else None
    return Completion(msg.request_id, msg.model, choices, usage_from_proto(msg.usage), seed)


def models_from_proto(msg: generation_pb2.ListModelsResponse) -> list[Model]:
    return [Model(m.id, m.max_model_len, m.owned_by, m.created) for m in msg.models]


def list_models_request() -> generation_pb2.ListModelsRequest:
    return generation_pb2.ListModelsRequest()
