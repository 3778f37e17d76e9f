"""Everything one stage process holds: its runtime, its data plane, and its role —
the replica head (engine: scheduling, embedding, streaming tokens back) or a downstream
stage (relay). Servicers call into this; it never touches protobuf."""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from stagekit.engine.engine import Engine
from stagekit.engine.relay import StageRelay
from stagekit.engine.stage_runtime import StageRuntime
from stagekit.errors import InvalidRequest, StageUnavailable
from stagekit.rpc.channels import stage_channel
from stagekit.rpc.mesh_credentials import PLAINTEXT, MeshCredentials
from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from stagekit.tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_FILES
from stagekit.transport.base import Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    address: str
    start_layer: int
    end_layer: int
    num_layers: int
    model_name: str
    kv_capacity_tokens: int
    transport_address: bytes
    prefix_cache_blocks: int
    kv_block_size: int
    transport: str   # the stage's data plane ("grpc", "ucx")


class StageNode:
    """Invariant: exactly one of ``engine`` (head) and ``relay`` (downstream) is set."""

    def __init__(self, runtime: StageRuntime, transport: Transport, pool: ThreadPoolExecutor,
                 creds: MeshCredentials = PLAINTEXT) -> None:
        self.runtime, self.transport, self.pool = runtime, transport, pool
        self.creds = creds   # for the calls to the other stages of the pipeline
        self.layout, self.cfg = runtime.layout, runtime.cfg
        self.engine: Engine | None = None
        self.relay: StageRelay | None = None
        self.pipeline: list[str] = []
        if self.layout.is_first:
            spec = runtime.spec
            self.engine = Engine(runtime, transport, pool, step_timeout_s=spec.step_timeout_s,
                                 max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_batched_tokens)
        else:
            self.relay = StageRelay(runtime, transport, pool)

    def start(self) -> None:
        (self.engine or self.relay).start()

    async def stop(self) -> None:
        await (self.engine or self.relay).stop()
        await self.transport.close()
        if self.runtime.dp is not None:
            self.runtime.dp.close()   # stops a rejoin waiting for the group on the compute thread
        self.pool.submit(self.runtime.shutdown).result()
        self.pool.shutdown(wait=True)

    @property
    def wired(self) -> bool:
        return bool(self.pipeline) or (self.layout.is_first and self.layout.is_last)

    def tokenizer_files(self) -> dict[str, bytes]:
        root = Path(self.cfg.path)
        names = (*TOKENIZER_FILES, CHAT_TEMPLATE_FILE)
        return {name: (root / name).read_bytes() for name in names if (root / name).is_file()}

    async def wire(self, pipeline: list[str], index: int) -> None:
        """Point the data plane at the next stage (the last stage points back at the head).
        Everything is checked before anything changes: a refused Wire leaves the stage as it was."""
        self._check_position(pipeline, index)
        peer = await _peer_info(pipeline[(index + 1) % len(pipeline)], self.creds) if len(pipeline) > 1 else None
        if peer is not None:
            self._check_plane(pipeline[index], peer)
            if self.engine is None:  # the head checks the whole pipeline below
                self._check_next(peer, index == len(pipeline) - 1)
        peers: list[PeerInfo] = []
        if self.engine is not None:
            peers = [await _peer_info(addr, self.creds) for addr in pipeline]
            for p in peers:
                self._check_plane(pipeline[index], p)
            self._check_pipeline(peers)
        self.transport.local_name = pipeline[index]
        if peer is not None:
            await self.transport.connect(peer.address, peer.transport_address)
        if self.engine is not None:
            num_blocks = min(p.kv_capacity_tokens // p.kv_block_size for p in peers)
            self.engine.configure_kv(num_blocks, all(p.prefix_cache_blocks > 0 for p in peers))
            self.engine.pipeline_depth = len(pipeline)
            self.engine.pipeline_wired = True
        self.pipeline = list(pipeline)
        log.info("wired at position %d of %s", index, pipeline)

    def _check_position(self, pipeline: list[str], index: int) -> None:
        if not pipeline or not 0 <= index < len(pipeline):
            raise InvalidRequest(f"wiring index {index} is outside the pipeline of {len(pipeline)} stage(s)")
        if len(pipeline) > self.layout.num_layers:  # also bounds the work of the checks below
            raise InvalidRequest(f"a pipeline of {len(pipeline)} stages for a model of {self.layout.num_layers} "
                                 "layers: each stage holds at least one layer")
        twice = sorted(addr for addr, n in Counter(pipeline).items() if n > 1)
        if twice:
            raise InvalidRequest(f"the pipeline {pipeline} names {', '.join(twice)} more than once: each stage "
                                 "holds its own layers and sits at one position")
        if (index == 0) != self.layout.is_first or (index == len(pipeline) - 1) != self.layout.is_last:
            raise InvalidRequest(
                f"this stage holds layers {self.layout.start_layer}:{self.layout.end_layer} of "
                f"{self.layout.num_layers}; it cannot sit at position {index} of a {len(pipeline)}-stage pipeline"
            )

    def _check_next(self, peer: PeerInfo, last: bool) -> None:
        """The stage this one sends to holds the next layers (the head, after the last stage):
        a pipeline that loops back to this stage under another address would never finish a step."""
        expect = 0 if last else self.layout.end_layer
        if peer.model_name != self.cfg.name or peer.start_layer != expect:
            raise InvalidRequest(
                f"stage {peer.address} holds layers {peer.start_layer}:{peer.end_layer} of {peer.model_name!r}; "
                f"the stage after this one (layers {self.layout.start_layer}:{self.layout.end_layer} of "
                f"{self.cfg.name!r}) must start at layer {expect}"
            )

    def _check_plane(self, me: str, peer: PeerInfo) -> None:
        """One data plane per replica: a frame from a stage on another plane could not
        reach this one (a UCX stage has no gRPC inbound path, a gRPC stage no UCX one)."""
        if peer.transport and peer.transport != self.transport.name:
            raise InvalidRequest(f"stage {me} runs the {self.transport.name!r} data plane and stage {peer.address} "
                                 f"the {peer.transport!r} one: start every stage of a replica with the same "
                                 "--transport")

    def _check_pipeline(self, peers: list[PeerInfo]) -> None:
        expect = 0
        for p in peers:
            if p.model_name != self.cfg.name or p.num_layers != self.cfg.num_layers:
                raise InvalidRequest(f"stage {p.address} serves {p.model_name!r}, not {self.cfg.name!r}")
            if p.start_layer != expect:
                raise InvalidRequest(f"stage {p.address} starts at layer {p.start_layer}, expected {expect}: "
                                     "the pipeline's layer ranges must be contiguous and in order")
            if p.kv_block_size != self.runtime.kv_cache.block_size:
                raise InvalidRequest(f"stage {p.address} uses KV blocks of {p.kv_block_size} tokens, this head "
                                     f"{self.runtime.kv_cache.block_size}: start every stage with the same "
                                     "--block-size")
            expect = p.end_layer
        if expect != self.cfg.num_layers:
            raise InvalidRequest(f"the pipeline ends at layer {expect} of {self.cfg.num_layers}")


async def _peer_info(address: str, creds: MeshCredentials) -> PeerInfo:
    try:
        async with stage_channel(address, creds) as ch:
            info = await stage_pb2_grpc.StageStub(ch).GetInfo(stage_pb2.GetInfoRequest(), timeout=10)
    except grpc.aio.AioRpcError as e:
        raise StageUnavailable(f"stage {address} did not answer: {e.code().name} {e.details()}") from None
    return PeerInfo(address, info.start_layer, info.end_layer, info.num_layers, info.model_name,
                    info.kv_capacity_tokens, info.transport_address, info.prefix_cache_blocks,
                    info.kv_block_size or 16, info.transport)
