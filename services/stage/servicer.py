"""Thin gRPC servicer of the stage: decode the request, call the node, encode the reply."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.stage.kv_port import KvPort
from services.stage.node import StageNode
from stagekit.errors import InvalidRequest, StagemeshError
from stagekit.rpc import stage_proto
from stagekit.rpc.pb import common_pb2, stage_pb2, stage_pb2_grpc
from stagekit.rpc.status import status_for, stream_errors, unary_errors

_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}


class StageServicer(stage_pb2_grpc.StageServicer):
    def __init__(self, node: StageNode, kv: KvPort, transport_name: str) -> None:
        self.node, self.kv = node, kv
        self.transport_name = transport_name

    def info(self) -> stage_pb2.StageInfo:
        n, cfg, lay = self.node, self.node.cfg, self.node.layout
        info = stage_pb2.StageInfo(
            model_name=cfg.name, architecture=cfg.architecture, start_layer=lay.start_layer,
            end_layer=lay.end_layer, num_layers=lay.num_layers, tp_size=lay.tp_size,
            dtype=str(n.runtime.dtype).removeprefix("torch."),
            kv_capacity_tokens=n.runtime.kv_cache.capacity_tokens, vocab_size=cfg.vocab_size,
            max_model_len=cfg.max_model_len, is_first=lay.is_first, is_last=lay.is_last,
            eos_token_ids=cfg.eos_token_ids, transport=self.transport_name, wired=n.wired,
            kv_used_tokens=n.runtime.kv_cache.used_tokens, transport_address=n.transport.local_address(),
            prefix_cache_blocks=n.runtime.kv_cache.num_blocks if n.runtime.spec.prefix_caching else 0,
            kv_block_size=n.runtime.kv_cache.block_size,
            moe_parallel=n.runtime.spec.moe_parallel if cfg.num_experts else "",
            weight_dtype=n.runtime.spec.weight_dtype,
            expert_load=[stage_pb2.ExpertLoad(layer=e.layer, tokens=e.tokens) for e in n.runtime.expert_load()],
        )
        dp = n.runtime.dp
        if dp is not None:
            spec = n.runtime.spec
            info.dp_group, info.dp_rank, info.dp_size = spec.dp_group, spec.dp_rank, spec.dp_size
            info.dp_state, info.dp_detail = dp.state, dp.detail
        if n.engine is not None:
            head = n.engine.head_stats()
            info.num_running, info.num_waiting = head.num_running, head.num_waiting
            info.prefix_query_tokens, info.prefix_hit_tokens = head.prefix_query_tokens, head.prefix_hit_tokens
            info.num_preemptions = head.num_preemptions
            info.steps_completed = head.steps_completed
            info.kv_blocks_referenced = head.kv_blocks_used
            info.kv_holds = len(self.kv.holds) if self.kv.holds is not None else 0
        return info

    @unary_errors
    async def GetInfo(self, request: stage_pb2.GetInfoRequest,
                      context: grpc.aio.ServicerContext) -> stage_pb2.StageInfo:
        return self.info()

    @unary_errors
    async def GetTokenizer(self, request: stage_pb2.GetTokenizerRequest,
                           context: grpc.aio.ServicerContext) -> stage_pb2.TokenizerFiles:
        files = self.node.tokenizer_files()
        return stage_pb2.TokenizerFiles(
            files=[stage_pb2.TokenizerFile(name=k, content=v) for k, v in files.items()]
        )

    @unary_errors
    async def Wire(self, request: stage_pb2.WireRequest, context: grpc.aio.ServicerContext) -> stage_pb2.WireResponse:
        if request.transport and request.transport != self.transport_name:
            raise InvalidRequest(f"this stage runs the {self.transport_name!r} data plane, "
                                 f"the pipeline asked for {request.transport!r}")
        await self.node.wire(list(request.pipeline), request.index)
        return stage_pb2.WireResponse(info=self.info())

    def _engine(self):  # noqa: ANN202
        if self.node.engine is None:
            raise InvalidRequest(
                f"this stage holds layers {self.node.layout.start_layer}:{self.node.layout.end_layer}; "
                "send generation requests to the replica head (the stage holding layer 0)"
            )
        return self.node.engine

    @stream_errors
    async def Generate(self, request: stage_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[stage_pb2.GenerateResponse]:
        engine = self._engine()
        params = stage_proto.sampling_from_proto(request.sampling)
        prompt = list(request.prompt_token_ids)
        if request.kv_hold_ms < 0:
            raise InvalidRequest(f"kv_hold_ms must be >= 0, got {request.kv_hold_ms}")
        async for out in engine.generate(request.request_id, prompt, params):
            if out.finish_reason == "length" and request.kv_hold_ms and self.kv.holds is not None:
                # a prefill/decode hand-off that goes on elsewhere: keep the prompt's blocks for its export
                # (kv_holds.py; a request that stopped here has nothing to hand over)
                self.kv.holds.hold(request.request_id, prompt, request.kv_hold_ms / 1000)
            yield stage_pb2.GenerateResponse(
                request_id=request.request_id, token_ids=out.token_ids, logprobs=out.logprobs,
                top_logprobs=stage_proto.tops_to_proto(out.top_logprobs),
                finish_reason=_FINISH.get(out.finish_reason or "", common_pb2.FINISH_REASON_UNSPECIFIED),
                prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
            )

    @unary_errors
    async def Abort(self, request: stage_pb2.AbortRequest,
                    context: grpc.aio.ServicerContext) -> stage_pb2.AbortResponse:
        found = self._engine().abort(request.request_id)
        held = self.kv.holds is not None and self.kv.holds.release(request.request_id)  # a hand-off given up
        return stage_pb2.AbortResponse(found=found or held)

    @unary_errors
    async def ExportKv(self, request: stage_pb2.ExportKvRequest,
                       context: grpc.aio.ServicerContext) -> stage_pb2.ExportKvResponse:
        if request.lease_ms < 0:
            raise InvalidRequest(f"lease_ms must be >= 0, got {request.lease_ms}")
        return await self.kv.export(list(request.token_ids), list(request.destination), self.node.pipeline,
                                    request.hold_id, request.lease_ms / 1000)

    @unary_errors
    async def ReserveKvBlocks(self, request: stage_pb2.ReserveKvBlocksRequest,
                              context: grpc.aio.ServicerContext) -> stage_pb2.ReserveKvBlocksResponse:
        return self.kv.reserve(list(request.hashes), request.block_size, max(0, request.lease_ms))

    @unary_errors
    async def CommitKvBlocks(self, request: stage_pb2.CommitKvBlocksRequest,
                             context: grpc.aio.ServicerContext) -> stage_pb2.CommitKvBlocksResponse:
        self.kv.commit(request.import_id, request.ok)
        return stage_pb2.CommitKvBlocksResponse()

    @unary_errors
    async def SendKvBlocks(self, request: stage_pb2.SendKvBlocksRequest,
                           context: grpc.aio.ServicerContext) -> stage_pb2.SendKvBlocksResponse:
        sent, path = await self.kv.send_blocks(list(request.blocks), request.destination,
                                               list(request.destination_blocks), request.land_by_unix_ms)
        return stage_pb2.SendKvBlocksResponse(bytes_sent=sent, transport=path)

    async def PushKvBlocks(self, request_iterator: AsyncIterator[stage_pb2.KvBlocksChunk],
                           context: grpc.aio.ServicerContext) -> stage_pb2.PushKvBlocksResponse:
        try:
            got = await self.kv.receive(request_iterator)
        except grpc.aio.AbortError:  # already answered (a malformed chunk: MalformedRequestGuard)
            raise
        except Exception as e:
            await context.abort(status_for(e), str(e) or type(e).__name__)
        return stage_pb2.PushKvBlocksResponse(bytes_received=got)

    async def PushFrames(self, request_iterator: AsyncIterator[stage_pb2.Frame],
                         context: grpc.aio.ServicerContext) -> stage_pb2.PushFramesResponse:
        try:
            async for frame in request_iterator:
                await self.node.transport.deliver(frame)
        except StagemeshError as e:   # e.g. frames pushed to a stage that runs another data plane
            await context.abort(status_for(e), str(e))
        return stage_pb2.PushFramesResponse()
