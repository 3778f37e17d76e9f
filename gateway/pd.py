"""Prefill/decode disaggregation: the gateway hands a choice from a prefill replica to a decode
replica after its first token, moving the prompt's KV between them.

The flow of one choice (`Handoff.run`; the rest of the choice is `generate_choice`'s ordinary
loop on the decode replica):

1. Pick the decode replica first (the router, prefix-aware by default, among decode and both
   replicas) and take a slot there. If the gateway's prefix index says it served all of the
   prompt but a tail of at most ``min_prefill_tokens``, the choice goes straight to it.
2. Else a prefill replica runs the prompt with max_tokens 1 and the choice's seed and output
   position, so its one token is the token a colocated run samples first; it reaches the
   client at once. The prefill head then holds the prompt's blocks under the hand-off's
   lease (`GenerateRequest.kv_hold_ms`).
3. ExportKv moves those blocks into blocks reserved on the decode replica (UCX bulk, or gRPC),
   within the lease; the hold and the reservation end with it, whatever the outcome.
4. The decode replica gets the prompt plus the first token, the seed and output position 1
   (as a migration would), takes the moved blocks as a prefix-cache hit and prefills only the
   tail: the tokens are those a colocated replica gives.

Nothing waits beyond the lease. A prefill that fails is retried on another prefill replica; a
transfer that fails or times out, or no prefill replica to run, makes the decode replica
prefill the prompt itself (or, when the decode replica died, another decode replica): counted
in ``stagemesh_pd_fallbacks_total{reason}`` and logged with the reason, never silent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from gateway.domain import FinishReason, GenerateChunk
from gateway.errors import InternalError
from gateway.generation import ChoiceDelta, _ChoiceState
from gateway.pd_metrics import PdMetrics, TokenClock
from gateway.roles import DECODES, PREFILL, PREFILLS, PdSettings, layout_mismatch
from stagekit.errors import (
    CapacityExceeded,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    StagemeshError,
    StageUnavailable,
)

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics
    from gateway.pool import Lease, ReplicaPool

logger = logging.getLogger("stagemesh.gateway")
_DEFAULT_BLOCK_SIZE = 16


def install_pd(pool: ReplicaPool, settings: PdSettings, metrics: GatewayMetrics | None) -> Disaggregation:
    """Turn on disaggregation for a started pool: refuse it (`StartupError`) when the replicas
    wired so far cannot exchange KV, and check every replica that joins later the same way."""
    from gateway.pool import StartupError

    pd = Disaggregation(settings, PdMetrics(metrics.registry) if metrics is not None else None)
    errors = pd.check_layouts(pool)
    if errors:
        raise StartupError("prefill/decode disaggregation refused: " + "; ".join(errors))
    pool.pd = pd
    pool.probe_listeners.append(pd.check_layouts)
    logger.info("prefill/decode disaggregation: prefill replicas %s, decode replicas %s (lease %gs, "
                "min prefill %d tokens)", pd.indexes(pool, PREFILLS), pd.indexes(pool, DECODES),
                settings.lease_s, settings.min_prefill_tokens)
    return pd


class Disaggregation:
    """The gateway's prefill/decode mode: settings, metrics and the layout check. Invariant: a
    replica whose layer ranges differ from the prefill replicas' (or, for a prefill replica,
    from the decode replicas') carries a ``role_error`` and is never routed to."""

    def __init__(self, settings: PdSettings, metrics: PdMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics

    def handoff(self, pool: ReplicaPool, state: _ChoiceState) -> Handoff:
        return Handoff(self, pool, state)

    def check_layouts(self, pool: ReplicaPool) -> list[str]:
        """Refuse replicas whose stages cannot exchange KV with the other role's (``role_error``);
        the reference layout is the first wired prefill replica's. Returns the errors."""
        wired = [r for r in pool.replicas if r.stage_infos]
        prefills = [r for r in wired if r.role == PREFILL]
        if not prefills:
            return []
        reference = prefills[0]
        errors = []
        for r in wired:
            why = layout_mismatch(reference.stage_infos, r.stage_infos) if r is not reference else None
            if why is not None:
                why = f"replica {r.index} ({r.role}) cannot exchange KV with replica {reference.index}: {why}"
                if r.role_error != why:
                    logger.error("refusing %s", why)
                errors.append(why)
            r.role_error = why
        return errors

    @staticmethod
    def indexes(pool: ReplicaPool, roles: frozenset[str]) -> list[int]:
        return [r.index for r in pool.replicas if r.role in roles]

    def snapshot(self) -> dict[str, Any]:
        """For /health: the settings (each replica's role is in its own entry)."""
        return {"min_prefill_tokens": self.settings.min_prefill_tokens, "lease_s": self.settings.lease_s}

    def clock(self) -> TokenClock:
        return TokenClock(self.metrics, time.monotonic())

    def count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.handoffs.labels(outcome=outcome).inc()


class Handoff:
    """One choice's way to its decode replica. After `run`: ``finished`` (the prefill replica
    ended it), else ``decode_lease`` (the slot to continue on; None: pick another decode
    replica, avoiding ``excluded``). Invariant: every lease it took is released or handed over."""

    def __init__(self, pd: Disaggregation, pool: ReplicaPool, state: _ChoiceState) -> None:
        self.pd, self.pool, self.state = pd, pool, state
        self.clock = pd.clock()
        self.finished = False
        self.decode_lease: Lease | None = None
        self.excluded: set[int] = set()

    def tick(self, role: str, delta: ChoiceDelta) -> None:
        self.clock.tick(role, len(delta.tokens), time.monotonic())

    async def run(self) -> AsyncIterator[ChoiceDelta]:
        prompt, sampling = self.state.next_request()
        self.decode_lease = await self.pool.acquire(prompt, sampling.max_tokens)
        try:
            async with aclosing(self._run(prompt)) as deltas:
                async for delta in deltas:
                    yield delta
        except BaseException:
            self._drop_decode()
            raise
        if self.finished:
            self._drop_decode()

    def _drop_decode(self) -> None:
        if self.decode_lease is not None:
            self.decode_lease.release()
            self.decode_lease = None

    async def _run(self, prompt: tuple[int, ...]) -> AsyncIterator[ChoiceDelta]:
        assert self.decode_lease is not None
        decode = self.decode_lease.replica
        if len(prompt) - self.decode_lease.matched_tokens <= self.pd.settings.min_prefill_tokens:
            self.pd.count("direct")
            return
        info = decode.head_info
        block_size = info.kv_block_size if info is not None and info.kv_block_size else _DEFAULT_BLOCK_SIZE
        movable = len(prompt) >= block_size
        tried: set[int] = set()
        while True:
            try:
                lease = await self.pool.acquire(prompt, 1, exclude=frozenset(tried), roles=PREFILLS)
            except (StageUnavailable, CapacityExceeded) as err:
                reason = "prefill_failed" if tried else (
                    "prefill_busy" if isinstance(err, CapacityExceeded) else "no_prefill_replica")
                self._fallback(reason, err, decode.index)
                return
            tried.add(lease.replica.index)
            try:
                # a request of one token ends on the prefill replica: nothing to hold for
                hold = movable and self.state.job.sampling.max_tokens > 1
                async with aclosing(self._prefill(lease, prompt, hold)) as deltas:
                    async for delta in deltas:
                        self.tick(lease.replica.role, delta)
                        yield delta
                if self.finished:
                    self.pd.count("prefill_only")
                    if hold:   # a stop string ended it: the prefill replica may hold blocks for nothing
                        self.pool.spawn(lease.replica.abort(_prefill_id(self.state.job.request_id)))
                    return
                self.decode_lease.consume(1)
                if not movable:
                    self.pd.count("short_prompt")
                    return
                await self._transfer(lease, prompt)
                return
            except (StageUnavailable, CapacityExceeded) as err:
                if self.state.generated:
                    raise
                if isinstance(err, StageUnavailable):
                    lease.replica.mark_unhealthy(str(err))
                logger.warning("%s: prefill on replica %d failed (%s); trying another prefill replica",
                               self.state.job.request_id, lease.replica.index, err)
            finally:
                lease.release()

    async def _prefill(self, lease: Lease, prompt: tuple[int, ...], hold: bool) -> AsyncIterator[ChoiceDelta]:
        """The first token from the prefill replica, which then holds the prompt's blocks."""
        job, replica = self.state.job, lease.replica
        s = job.sampling
        first = replace(s, max_tokens=1, min_tokens=min(s.min_tokens, 1))
        hold_ms = int(self.pd.settings.lease_s * 1000) if hold else 0
        done = False
        try:
            stream = replica.generate(_prefill_id(job.request_id), prompt, first, kv_hold_ms=hold_ms)
            async with aclosing(stream):
                async for chunk in stream:
                    lease.consume(len(chunk.token_ids))
                    done = chunk.finish_reason is not None
                    if chunk.finish_reason == FinishReason.LENGTH and s.max_tokens > 1:
                        chunk = replace(chunk, finish_reason=None)   # our cap, not the request's end
                    delta = self._emit(chunk)
                    if delta is not None:
                        yield delta
                    if self.finished or done:
                        return
            done = True
            raise InternalError(f"prefill replica {replica.index} ended {job.request_id} without its first token")
        finally:
            if not done:
                self.pool.spawn(replica.abort(_prefill_id(job.request_id)))

    def _emit(self, chunk: GenerateChunk) -> ChoiceDelta | None:
        """What the client sees of the prefill replica's chunk (as `generate_choice` renders one)."""
        state, job = self.state, self.state.job
        if state.add(chunk):
            self.finished = True
            delta, tokens = state.text.release(final=True)
            return ChoiceDelta(job.index, delta, tokens, FinishReason.STOP.value, len(state.generated))
        if chunk.finish_reason is not None:
            self.finished = True
            state.text.add_text(state.detok.flush())
            reason = FinishReason.STOP if state.text.stopped else chunk.finish_reason
            delta, tokens = state.text.release(final=True)
            return ChoiceDelta(job.index, delta, tokens, reason.value, len(state.generated))
        delta, tokens = state.text.release()
        return ChoiceDelta(job.index, delta, tokens) if delta or tokens else None

    async def _transfer(self, lease: Lease, prompt: tuple[int, ...]) -> None:
        """Move the prompt's KV from the prefill replica to the decode replica, or fall back."""
        assert self.decode_lease is not None
        source, decode = lease.replica, self.decode_lease.replica
        started = time.monotonic()
        try:
            num_tokens, nbytes, path = await source.export_kv(
                prompt, decode.addresses, _prefill_id(self.state.job.request_id), self.pd.settings.lease_s
            )
        except StagemeshError as err:
            if not await decode.probe():
                self.excluded.add(decode.index)
                self._drop_decode()
                self._fallback("decode_down", err, None)
                if not self.pool.has_other(self.excluded):
                    raise StageUnavailable(
                        f"the decode replica {decode.index} failed during the hand-off ({err}) and no other decode "
                        "replica is available"
                    ) from err
                return
            self._fallback(_reason(err), err, decode.index)
            return
        took = time.monotonic() - started
        if self.pd.metrics is not None:
            self.pd.metrics.transfer_seconds.observe(took)
            self.pd.metrics.transfer_bytes.inc(nbytes)
        self.pd.count("transferred")
        logger.debug("%s: KV of %d tokens moved from replica %d to %d over %s in %.3f s (%d bytes)",
                     self.state.job.request_id, num_tokens, source.index, decode.index, path or "-", took, nbytes)

    def _fallback(self, reason: str, err: BaseException, decode: int | None) -> None:
        self.pd.count("fallback")
        if self.pd.metrics is not None:
            self.pd.metrics.fallbacks.labels(reason=reason).inc()
        who = f"decode replica {decode}" if decode is not None else "another decode replica"
        logger.warning("%s: prefill/decode hand-off fell back (%s: %s); %s prefills the prompt itself",
                       self.state.job.request_id, reason, err, who)


def _prefill_id(request_id: str) -> str:
    return f"{request_id}-prefill"


def _reason(err: BaseException) -> str:
    """The fallback reason label of a failed export."""
    if isinstance(err, DeadlineExceeded | asyncio.TimeoutError):
        return "transfer_timeout"
    if isinstance(err, NotFound):
        return "blocks_gone"
    if isinstance(err, CapacityExceeded):
        return "decode_full"
    if isinstance(err, InvalidRequest):
        return "refused"
    return "transfer_failed"
