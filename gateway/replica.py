"""`ReplicaClient`: the gateway's view of one pipeline of stages, reached over gRPC."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from gateway import stage_proto
from gateway.admission import ReplicaGate
from gateway.domain import GenerateChunk, StageInfo
from gateway.dp_groups import forming_reason
from gateway.errors import ReplicaEvicted, from_rpc_error
from stagekit.errors import InvalidRequest, StagemeshError, StageUnavailable
from stagekit.rpc.channels import stage_channel
from stagekit.rpc.mesh_credentials import PLAINTEXT, MeshCredentials
from stagekit.rpc.pb import stage_pb2, stage_pb2_grpc
from stagekit.types.sampling_params import SamplingParams

logger = logging.getLogger("stagemesh.gateway")

# Tokenizer files of real models are several MiB, above gRPC's 4 MiB default.
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    # A restarted stage should be found within a probe or two, not after minutes of back-off.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class ReplicaClient:
    """One replica: stage addresses in layer order, index 0 being the head that serves Generate.

    Invariant: ``healthy`` is True only after every stage accepted Wire and answered the last
    probe, none of them reporting its DP group forming; the router only hands out ``serving``
    replicas: healthy, not held out by their DP group (`hold`) and not draining (admin API).
    Channels are opened lazily, inside the event loop that uses them, and never again once
    ``close``d. ``gate`` bounds what the gateway sends it (admission control); listeners hear every
    change of ``healthy``. Every Generate call in flight is known (``active_requests``), so that
    `evict_all` can move them elsewhere; ``last_progress`` is when one of them last got a token
    (or the head reported a completed step), read by the stall watch (stall.py).
    """

    def __init__(
        self,
        index: int,
        addresses: Sequence[str],
        *,
        transport: str = "",
        rpc_timeout_s: float = 5.0,
        gate: ReplicaGate | None = None,
        creds: MeshCredentials = PLAINTEXT,
        role: str = "both",
    ) -> None:
        if not addresses:
            raise ValueError(f"replica {index} has no stage addresses")
        self.index = index
        self.addresses = tuple(addresses)
        self.transport = transport
        self.rpc_timeout_s = rpc_timeout_s
        self.creds = creds  # TLS and mesh token toward the stages
        self.role = role  # "prefill", "decode" or "both" (gateway/roles.py)
        self.role_error: str | None = None  # why prefill/decode disaggregation refuses it (its layout)
        self.healthy = False
        self.joined = False  # healthy at least once: a replica never seen ready is still joining
        self.wired = False
        self.last_error: str | None = None
        self.hold_reason: str | None = None  # why its DP group keeps it out of routing (dp_groups.py)
        self.gate = gate or ReplicaGate(max_running=256, max_waiting=256)
        self.head_info: StageInfo | None = None
        self.stage_infos: list[StageInfo] = []  # every stage's, from the last probe
        self.health_listeners: list[Callable[[ReplicaClient], None]] = []
        self.draining = False  # admin API: no new requests; those in flight finish
        self.origin = "flag"  # where it came from: "flag" (--replica), "file" (--replica-file) or "admin"
        self.busy: str | None = None  # the admin operation under way on it (none run at once)
        self.needs_rewire = False  # wire at the next probe even if every stage says it is wired
        # the stall watch (stall.py): taken out (cleared once healthy again), the head's completed steps
        # then, since when its stages answer again without one, how long that may last before a
        # re-wire, and before when probes leave it out altogether (repeated stalls)
        self.stalled = False
        self.stall_steps = 0
        self.answering_since: float | None = None
        self.rewire_after_s = 0.0
        self.out_until = 0.0
        self.last_progress = time.monotonic()
        self.closed = False
        self._calls: dict[str, grpc.aio.UnaryStreamCall] = {}
        self._evicted: dict[str, str] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[stage_pb2_grpc.StageStub] = []

    def __repr__(self) -> str:
        return f"ReplicaClient({self.index}, {list(self.addresses)})"

    @property
    def id(self) -> str:
        """The admin API's name for it: ``r<index>`` (indices are never reused)."""
        return f"r{self.index}"

    @property
    def serving(self) -> bool:
        return self.healthy and self.hold_reason is None and not self.draining and self.role_error is None

    @property
    def active_requests(self) -> int:
        return len(self._calls)

    @property
    def state(self) -> str:
        """For /health: serving, draining (admin API), held (by its DP group), down (after serving)
        or joining (never ready yet)."""
        if self.draining:
            return "draining"
        if self.serving:
            return "serving"
        if self.healthy:
            return "refused" if self.role_error is not None else "held"
        return "down" if self.joined else "joining"

    @property
    def load(self) -> int:
        return self.gate.load

    @property
    def outstanding_tokens(self) -> int:
        return self.gate.outstanding_tokens

    def _stub(self, stage: int) -> stage_pb2_grpc.StageStub:
        if self.closed:
            raise StageUnavailable(f"replica {self.index} was removed")
        if not self._stubs:
            for address in self.addresses:
                channel = stage_channel(address, self.creds, _CHANNEL_OPTIONS)
                self._channels.append(channel)
                self._stubs.append(stage_pb2_grpc.StageStub(channel))
        return self._stubs[stage]

    def _where(self, stage: int) -> str:
        return f"replica {self.index} stage {stage} ({self.addresses[stage]})"

    async def wire(self) -> StageInfo:
        """Tell every stage its pipeline, last stage first; returns the head's info."""
        infos: list[StageInfo] = []
        for stage in reversed(range(len(self.addresses))):
            request = stage_proto.wire_request(self.addresses, stage, self.transport)
            try:
                reply = await self._stub(stage).Wire(request, timeout=self.rpc_timeout_s)
            except grpc.aio.AioRpcError as err:
                raise from_rpc_error(err, where=self._where(stage)) from err
            infos.insert(0, stage_proto.info_from_proto(reply.info))
        self.head_info, self.stage_infos = infos[0], infos
        self.wired = True
        return infos[0]

    async def refresh(self) -> StageInfo:
        """Fetch every stage's info, wiring the replica if a stage forgot its pipeline (a restart);
        raises `StageUnavailable` while a stage's DP group is forming. Returns the head's info."""
        infos = await asyncio.gather(*(self.stage_info(i) for i in range(len(self.addresses))))
        if not self.wired or self.needs_rewire or not all(info.wired for info in infos):
            await self.wire()
            self.needs_rewire = False
        else:
            self.head_info, self.stage_infos = infos[0], list(infos)
        reason = forming_reason(self.stage_infos)
        if reason is not None:
            raise StageUnavailable(reason)
        assert self.head_info is not None
        return self.head_info

    async def wait_wired(self, timeout_s: float) -> StageInfo:
        """Wire the replica, retrying with back-off until every stage answers (and its DP group,
        if any, has formed) or time runs out."""
        deadline = time.monotonic() + timeout_s
        delay, last_logged = 0.1, ""
        while True:
            try:
                info = await self.refresh()
            except StagemeshError as err:
                self.last_error = str(err)  # why it is missing, for /health once the gateway serves without it
                # A stage that answers "invalid" (e.g. another data plane) will not change its mind.
                if isinstance(err, InvalidRequest) or time.monotonic() + delay > deadline:
                    raise
                if str(err) != last_logged:
                    logger.info("waiting for replica %d: %s", self.index, err)
                    last_logged = str(err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            logger.info("replica %d wired: %s (model %s)", self.index, list(self.addresses), info.model_name)
            self.mark_healthy()
            return info

    async def stage_info(self, stage: int = 0) -> StageInfo:
        try:
            reply = await self._stub(stage).GetInfo(stage_pb2.GetInfoRequest(), timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, where=self._where(stage)) from err
        return stage_proto.info_from_proto(reply)

    async def tokenizer_files(self) -> dict[str, bytes]:
        try:
            reply = await self._stub(0).GetTokenizer(
                stage_pb2.GetTokenizerRequest(), timeout=max(self.rpc_timeout_s, 30.0)
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, where=self._where(0)) from err
        return stage_proto.tokenizer_files_from_proto(reply)

    async def probe(self) -> bool:
        """Ask every stage for its info; re-wire when one forgot its pipeline (a restart)."""
        if self.closed or time.monotonic() < self.out_until:
            return False
        try:
            await self.refresh()
            if self.stalled and not await self._stall_over():
                return False
        except StagemeshError as err:
            self.answering_since = None
            self.mark_unhealthy(str(err))
            return False
        self.mark_healthy()
        return True

    async def _stall_over(self) -> bool:
        """A stalled replica serves again once its head completed a step (a stopped stage went on:
        its steps in flight came back), or, if its stages answer for ``rewire_after_s`` without one
        (a wedged link), once it is re-wired. Not re-wired at once: a re-wire while the steps of a
        stage that just continued are in flight could lose them, leaving the head to wait out its
        step timeout."""
        steps = self.head_info.steps_completed if self.head_info is not None else 0
        if steps != self.stall_steps:
            return True
        now = time.monotonic()
        self.answering_since = self.answering_since or now
        if now - self.answering_since < self.rewire_after_s:
            return False
        logger.info("replica %s answers but completed no step for %.0fs: re-wiring it", self.id,
                    now - self.answering_since)
        await self.wire()
        return True

    def moe_summary(self) -> dict | None:
        """The expert load of the replica's MoE layers (all its stages), from the last probe:
        per layer the tokens routed and the imbalance (max/mean over its experts); None for
        dense models. The input to expert rebalancing; stages export per-expert counts."""
        loads = sorted((load for info in self.stage_infos for load in info.expert_load), key=lambda x: x.layer)
        if not loads:
            return None
        return {
            "moe_parallel": next((i.moe_parallel for i in self.stage_infos if i.moe_parallel), ""),
            "max_imbalance": round(max(x.imbalance for x in loads), 4),
            "layers": {str(x.layer): {"tokens": x.total, "imbalance": round(x.imbalance, 4)} for x in loads},
        }

    def mark_healthy(self) -> None:
        changed = not self.healthy
        self.healthy, self.joined, self.last_error, self.stalled, self.answering_since = True, True, None, False, None
        if changed:
            logger.info("replica %d is healthy", self.index)
            self._notify()

    def mark_unhealthy(self, reason: str) -> None:
        changed = self.healthy
        self.healthy, self.last_error = False, reason
        # Whoever waits for a slot here retries elsewhere.
        self.gate.fail_waiters(StageUnavailable(f"replica {self.index} went down: {reason}"))
        if changed:
            logger.warning("replica %d taken out: %s", self.index, reason)
            self._notify()

    def hold(self, reason: str | None) -> None:
        """Keep the replica out of routing for ``reason`` (its DP group is down), or, with None,
        let it serve again once healthy; whoever waits for a slot here retries elsewhere."""
        if reason is not None and self.hold_reason is None:
            self.gate.fail_waiters(StageUnavailable(f"replica {self.index} taken out: {reason}"))
        self.hold_reason = reason

    def drain(self, on: bool = True) -> None:
        """Stop (or, with False, resume) routing new requests here; those in flight go on, and
        whoever waits for a slot here retries elsewhere."""
        if on and not self.draining:
            self.gate.fail_waiters(StageUnavailable(f"replica {self.index} is draining"))
        self.draining = on

    def evict_all(self, reason: str) -> int:
        """End every Generate call in flight with `ReplicaEvicted` (``reason``): the gateway
        continues each of them on another replica (migration). Returns how many."""
        for request_id, call in list(self._calls.items()):
            self._evicted[request_id] = reason
            call.cancel()
        return len(self._calls)

    async def replace_addresses(self, addresses: Sequence[str]) -> None:
        """Point the client at another pipeline (a stage replaced): closes the old channels; the
        caller wires it. Only while nothing runs here (`evict_all`, then wait)."""
        old = self._channels
        self._channels, self._stubs = [], []
        self.addresses = tuple(addresses)
        self.wired = False
        await asyncio.gather(*(channel.close() for channel in old), return_exceptions=True)

    def _notify(self) -> None:
        for listener in self.health_listeners:
            listener(self)

    async def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams, kv_hold_ms: int = 0
    ) -> AsyncIterator[GenerateChunk]:
        """Stream one request from the head; closing the iterator cancels the call. `evict_all`
        ends it with `ReplicaEvicted`. ``kv_hold_ms``: the head keeps the prompt's blocks that long
        for a hand-off's export (gateway/pd.py)."""
        call = self._stub(0).Generate(
            stage_proto.generate_request(request_id, prompt_token_ids, sampling, kv_hold_ms)
        )
        if not self._calls:
            self.last_progress = time.monotonic()  # the stall clock starts with the first request
        self._calls[request_id] = call
        try:
            async for reply in call:
                self.last_progress = time.monotonic()
                yield stage_proto.chunk_from_proto(reply)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, where=self._where(0)) from err
        except asyncio.CancelledError:
            # a cancelled call raises CancelledError in its reader; ours (not the task's) is an eviction
            reason = self._evicted.get(request_id)
            task = asyncio.current_task()
            # Task.cancelling is 3.11+; on 3.10 an eviction racing a cancellation reads as the eviction
            if reason is None or (task is not None and getattr(task, "cancelling", lambda: 0)()):
                raise
            raise ReplicaEvicted(f"replica {self.index}: {reason}") from None
        finally:
            call.cancel()
            self._calls.pop(request_id, None)
            self._evicted.pop(request_id, None)

    async def export_kv(
        self, token_ids: Sequence[int], destination: Sequence[str], hold_id: str, lease_s: float
    ) -> tuple[int, int, str]:
        """Move the KV of ``token_ids``' cached full blocks to the replica whose stages are
        ``destination`` (within ``lease_s``, releasing the hold ``hold_id``): (tokens, bytes, path)."""
        request = stage_proto.export_kv_request(token_ids, destination, hold_id, lease_s)
        try:
            # a little beyond the lease: the head's own deadline answers first, with its reason
            reply = await self._stub(0).ExportKv(request, timeout=lease_s + max(self.rpc_timeout_s, 2.0))
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, where=self._where(0)) from err
        return reply.num_tokens, reply.bytes_sent, reply.transport

    async def abort(self, request_id: str) -> bool:
        if self.closed:
            return False
        try:
            reply = await self._stub(0).Abort(stage_proto.abort_request(request_id), timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as err:
            logger.debug("abort %s on replica %d failed: %s", request_id, self.index, err.code().name)
            return False
        return reply.found

    async def close(self) -> None:
        self.closed = True
        await asyncio.gather(*(channel.close() for channel in self._channels), return_exceptions=True)
        self._channels.clear()
        self._stubs.clear()


async def stage_info_at(address: str, creds: MeshCredentials, timeout_s: float) -> StageInfo:
    """One stage's info over a channel of its own (a stage no replica uses yet)."""
    channel = stage_channel(address, creds, _CHANNEL_OPTIONS)
    try:
        reply = await stage_pb2_grpc.StageStub(channel).GetInfo(stage_pb2.GetInfoRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err, where=f"stage {address}") from err
    finally:
        await channel.close()
    return stage_proto.info_from_proto(reply)
