"""Protobuf <-> domain conversion for the Stage service (the only gateway module that builds messages)."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.domain import FinishReason, GenerateChunk, StageInfo, TopLogprob
from stagekit.rpc.pb import common_pb2, stage_pb2
from stagekit.types.expert_load import ExpertLoad
from stagekit.types.sampling_params import SamplingParams

_FINISH_FROM_PROTO = {
    common_pb2.FINISH_REASON_STOP: FinishReason.STOP,
    common_pb2.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    common_pb2.FINISH_REASON_ABORT: FinishReason.ABORT,
}


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        top_logprobs=params.top_logprobs,
        seed_offset=params.seed_offset,
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def generate_request(
    request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams, kv_hold_ms: int = 0
) -> stage_pb2.GenerateRequest:
    return stage_pb2.GenerateRequest(
        request_id=request_id,
        prompt_token_ids=list(prompt_token_ids),
        sampling=sampling_to_proto(sampling),
        kv_hold_ms=kv_hold_ms,
    )


def export_kv_request(
    token_ids: Sequence[int], destination: Sequence[str], hold_id: str, lease_s: float
) -> stage_pb2.ExportKvRequest:
    return stage_pb2.ExportKvRequest(
        token_ids=list(token_ids), destination=list(destination), hold_id=hold_id, lease_ms=int(lease_s * 1000)
    )


def chunk_from_proto(msg: stage_pb2.GenerateResponse) -> GenerateChunk:
    return GenerateChunk(
        token_ids=tuple(msg.token_ids),
        logprobs=tuple(msg.logprobs),
        top_logprobs=tuple(
            tuple(TopLogprob(token_id=t.token_id, logprob=t.logprob) for t in entry.top) for entry in msg.top_logprobs
        ),
        finish_reason=_FINISH_FROM_PROTO.get(msg.finish_reason),
        prompt_tokens=msg.prompt_tokens,
        completion_tokens=msg.completion_tokens,
    )


def wire_request(pipeline: Sequence[str], index: int, transport: str) -> stage_pb2.WireRequest:
    return stage_pb2.WireRequest(pipeline=list(pipeline), index=index, transport=transport)


def abort_request(request_id: str) -> stage_pb2.AbortRequest:
    return stage_pb2.AbortRequest(request_id=request_id)


def info_from_proto(msg: stage_pb2.StageInfo) -> StageInfo:
    return StageInfo(
        model_name=msg.model_name,
        architecture=msg.architecture,
        start_layer=msg.start_layer,
        end_layer=msg.end_layer,
        num_layers=msg.num_layers,
        tp_size=msg.tp_size,
        dtype=msg.dtype,
        kv_capacity_tokens=msg.kv_capacity_tokens,
        vocab_size=msg.vocab_size,
        max_model_len=msg.max_model_len,
        is_first=msg.is_first,
        is_last=msg.is_last,
        eos_token_ids=tuple(msg.eos_token_ids),
        transport=msg.transport,
        wired=msg.wired,
        num_running=msg.num_running,
        num_waiting=msg.num_waiting,
        kv_used_tokens=msg.kv_used_tokens,
        prefix_cache_blocks=msg.prefix_cache_blocks,
        prefix_query_tokens=msg.prefix_query_tokens,
        prefix_hit_tokens=msg.prefix_hit_tokens,
        moe_parallel=msg.moe_parallel,
        expert_load=tuple(ExpertLoad(e.layer, tuple(e.tokens)) for e in msg.expert_load),
        dp_group=msg.dp_group,
        dp_rank=msg.dp_rank,
        dp_size=msg.dp_size,
        dp_state=msg.dp_state,
        dp_detail=msg.dp_detail,
        steps_completed=msg.steps_completed,
        kv_block_size=msg.kv_block_size,
        kv_blocks_referenced=msg.kv_blocks_referenced,
        kv_holds=msg.kv_holds,
    )


def tokenizer_files_from_proto(msg: stage_pb2.TokenizerFiles) -> dict[str, bytes]:
    return {f.name: bytes(f.content) for f in msg.files}
