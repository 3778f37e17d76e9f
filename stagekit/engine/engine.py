"""The replica head's engine: admits requests, runs the step loop, streams tokens back.

One step: schedule -> run this stage's layers (compute thread) -> send the step down the
pipeline and wait for the last stage's sampled tokens (or sample here when the head is
also the last stage) -> postprocess (append tokens, finish, free). Up to
``pipeline_depth`` steps are in flight at once (one per stage of the pipeline, set when
the pipeline is wired), each over sequences no other in-flight step holds; results come
back by step id through the pending-result table.

A head of a data-parallel-attention group steps in lockstep with the group's other heads
(``_lockstep_loop``): before each step they agree, in one small all-reduce, whether any of
them has work; if one has, every head steps, those without work a dummy step that carries
no tokens through the pipeline but enters every MoE collective. When none has work they
all idle, polling every ``LOCKSTEP_IDLE_POLL_S``, and every ``LOCKSTEP_DEEP_IDLE_POLL_S`` once
idle for ``LOCKSTEP_DEEP_IDLE_AFTER_S`` (a request arriving wakes its head at once; the others
join within their poll). When the group fails, the head fails every request
it holds and waits until the group re-forms.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from stagekit.engine.kv_imports import KvImports
from stagekit.engine.prefix_cache import block_hashes
from stagekit.engine.scheduler import Scheduler, StepOutcome
from stagekit.engine.sequence import Sequence, SequenceStatus, TokenOutput
from stagekit.engine.stage_runtime import StageRuntime
from stagekit.engine.stats import HeadStats
from stagekit.errors import InvalidRequest, StagemeshError, StageUnavailable
from stagekit.transport.base import Transport
from stagekit.types.sampling_params import SamplingParams
from stagekit.types.step import Frame, IntermediateTensors, StepHeader, StepInputs, StepResult

log = logging.getLogger(__name__)

# how often the heads of an idle DP group poll each other: often at first (steps follow each
# other closely under load), rarely once the group has been idle a while (a request then waits
# up to the long poll for the other heads to join its first step)
LOCKSTEP_IDLE_POLL_S = 0.05
LOCKSTEP_DEEP_IDLE_AFTER_S = 2.0
LOCKSTEP_DEEP_IDLE_POLL_S = 0.25


class Engine:
    """Invariant: every admitted request ends with exactly one output carrying a
    finish_reason or an error, whatever happens to the pipeline."""

    def __init__(self, runtime: StageRuntime, transport: Transport, pool: ThreadPoolExecutor,
                 step_timeout_s: float = 120.0, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048) -> None:
        self.runtime, self.transport, self.pool = runtime, transport, pool
        self.step_timeout_s = step_timeout_s
        cfg = runtime.cfg
        self.vocab_size = cfg.vocab_size
        self.max_model_len = cfg.max_model_len
        kv, spec = runtime.kv_cache, runtime.executor.spec
        # Sequence and step ids are unique to this head process (they start at its start time in µs):
        # the stages downstream may still hold tables, and have steps in flight, of another head
        # process that sat where this one does (restarted, or replaced through the gateway's admin
        # API); a reused id would extend a stale block table or take a stale step's result.
        first_id = time.time_ns() // 1000
        self.scheduler = Scheduler(kv.num_blocks, self.max_model_len, cfg.eos_token_ids, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens, block_size=kv.block_size,
                                   prefix_caching=spec.prefix_caching, first_step_id=first_id)
        self.kv_imports = KvImports()  # blocks reserved for KV arriving from another replica
        self.kv_pool_generation = 0   # bumped whenever the block pool is replaced (configure_kv)
        self.pipeline_wired = runtime.layout.is_last  # a one-stage pipeline needs no wiring
        # steps in flight at once: one per stage keeps every stage busy (set by wiring)
        self.pipeline_depth = 1
        self.steps_completed = 0  # results back, since start (GetInfo: the gateway's stall watch)
        self._seq_ids = itertools.count(first_id)
        self._wake = asyncio.Event()
        self._pending: dict[int, asyncio.Future[StepResult]] = {}
        self._tasks: list[asyncio.Task] = []
        self.dp = runtime.dp
        if self.dp is not None:
            self._lockstep_thread = ThreadPoolExecutor(1, thread_name_prefix="dp-lockstep")
            self._orphans: set[asyncio.Task] = set()
            self._group_changed = asyncio.Event()
            loop = asyncio.get_running_loop()
            self.dp.listeners.append(lambda: loop.call_soon_threadsafe(self._group_changed.set))

    def start(self) -> None:
        loop = self._loop() if self.dp is None else self._lockstep_loop()
        self._tasks.append(asyncio.create_task(loop, name="engine-loop"))
        if not self.runtime.layout.is_last:
            self._tasks.append(asyncio.create_task(self._read_results(), name="engine-results"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.dp is not None:
            self._lockstep_thread.shutdown(wait=False)
        for seq in self.scheduler.fail_all():
            seq.outputs.put_nowait(TokenOutput([], [], error=StageUnavailable("stage is shutting down")))

    def configure_kv(self, num_blocks: int, prefix_caching: bool) -> None:
        """Schedule into ``num_blocks`` (the pipeline's smallest pool) after (re-)wiring.
        Running requests fail first if the pool changes size: their blocks may not exist."""
        if num_blocks != self.scheduler.blocks.num_blocks and self.scheduler.running:
            err = StageUnavailable("the pipeline was re-wired with a different KV pool; request failed")
            for seq in list(self.scheduler.running.values()):
                self.scheduler.finish(seq)
                seq.outputs.put_nowait(TokenOutput([], [], error=err))
        if num_blocks != self.scheduler.blocks.num_blocks:
            self.kv_imports.forget()
            self.kv_pool_generation += 1   # pins taken on the old pool must not be released on the new one
        self.scheduler.reset_blocks(num_blocks, prefix_caching)

    def head_stats(self) -> HeadStats:
        sch = self.scheduler
        bm = sch.blocks
        return HeadStats(len(sch.running), len(sch.waiting), sch.num_preemptions, bm.num_blocks, bm.num_used,
                         bm.num_cached, bm.prefix_caching, bm.query_tokens, bm.hit_tokens, self.steps_completed)

    # KV transfers between replicas (services/stage/kv_port.py): blocks move outside of steps,
    # so the exporter pins its blocks and the importer reserves its own while they do.
    @property
    def kv_block_size(self) -> int:
        return self.scheduler.blocks.block_size

    def pin_cached_prefix(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        """The hashes of the full blocks of ``token_ids`` and the cached blocks holding their
        longest cached prefix, pinned (referenced: not reclaimed) until ``unpin``."""
        bm = self.scheduler.blocks
        hashes = block_hashes(list(token_ids), bm.block_size)
        blocks = bm.match(hashes)
        bm.take(blocks)
        return hashes, blocks

    def unpin(self, blocks: list[int]) -> None:
        self.scheduler.blocks.release(blocks)

    def reserve_kv_import(self, hashes: list[int], block_size: int,
                          ttl_s: float | None = None) -> tuple[str, int, list[int], float]:
        """Blocks for KV arriving from another replica under ``hashes`` beyond the leading ones
        cached here already: (import id, how many are present, the reserved blocks, the time
        (``time.time()``) by which the stages must have written them). Unless committed, the
        reservation lapses after ``ttl_s`` (None: the default) and its blocks are freed a grace
        later, by a timer: an exporter that died must not leave them referenced until the next
        import, nor a stalled one write into them once they serve another request."""
        sch = self.scheduler
        reply = self.kv_imports.reserve(sch.blocks, hashes, block_size, headroom=sch.watermark_blocks, ttl_s=ttl_s)
        ttl = self.kv_imports.ttl_s if ttl_s is None else ttl_s
        asyncio.get_running_loop().call_later(ttl + self.kv_imports.grace_s + 0.05, self.kv_imports.expire,
                                              sch.blocks)
        return reply

    def commit_kv_import(self, import_id: str, ok: bool) -> None:
        """Name the reserved blocks by their hashes (``ok``: every stage holds them), or give them
        up (quarantined until their land-by time has passed, then freed by the reservation's timer)."""
        self.kv_imports.commit(self.scheduler.blocks, import_id, ok)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidRequest("prompt is empty: at least one token is needed")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        params.validate(self.vocab_size, self.runtime.cfg.eos_token_ids)
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                f"the model's context length {self.max_model_len}"
            )
        if total > self.scheduler.max_seq_tokens:
            raise InvalidRequest(f"request needs {total} tokens of KV cache; a request on this replica can "
                                 f"hold at most {self.scheduler.max_seq_tokens}")

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[TokenOutput]:
        """Stream a request's tokens; the last output has ``finish_reason`` set. Leaving the
        iteration early (the caller went away) aborts the request."""
        self.validate(prompt_ids, params)
        if not self.pipeline_wired:
            raise StageUnavailable("the pipeline of this replica is not wired yet")
        if self.dp is not None and not self.dp.ready:
            raise StageUnavailable(f"the DP group of this replica is forming: {self.dp.detail}")
        seq = Sequence(next(self._seq_ids), request_id, list(prompt_ids), params)
        self.scheduler.add(seq)
        self._wake.set()
        log.info("request %s admitted: %d prompt tokens, max_tokens %d", request_id, len(prompt_ids),
                 params.max_tokens)
        try:
            while True:
                out = await seq.outputs.get()
                if out.error is not None:
                    raise out.error
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            if seq.status != SequenceStatus.FINISHED:
                self.abort(request_id)

    def abort(self, request_id: str) -> bool:
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return False
        seq.finish_reason = "abort"
        seq.outputs.put_nowait(TokenOutput([], [], finish_reason="abort", num_prompt_tokens=len(seq.prompt_ids),
                                           num_output_tokens=len(seq.output_ids)))
        self._wake.set()
        log.info("request %s aborted", request_id)
        return True

    async def _loop(self) -> None:
        inflight: set[asyncio.Task] = set()
        while True:
            self._wake.clear()
            while len(inflight) < self.pipeline_depth:
                header = self.scheduler.schedule(self.pipeline_depth)
                if header is None:
                    break
                inflight.add(asyncio.create_task(self._step(header), name=f"step-{header.step_id}"))
            if not inflight:
                await self._wake.wait()
                continue
            wake = asyncio.create_task(self._wake.wait())
            done, _ = await asyncio.wait(inflight | {wake}, return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            inflight -= done

    async def _lockstep_loop(self) -> None:
        """``_loop`` for a head of a DP-attention group (module docstring)."""
        assert self.dp is not None
        dp, loop = self.dp, asyncio.get_running_loop()
        inflight: set[asyncio.Task] = set()
        idle_since = loop.time()
        while True:
            self._wake.clear()
            if not dp.ready:
                await self._wait_for_group(inflight)
                continue
            anyone = False
            while len(inflight) < self.pipeline_depth and dp.ready:
                header = self.scheduler.schedule(self.pipeline_depth) if self.pipeline_wired else None
                groups = self.runtime.executor.groups
                assert groups.dp is not None
                try:
                    anyone = await loop.run_in_executor(self._lockstep_thread, dp.agree, groups.dp,
                                                        header is not None, self.pipeline_wired)
                except StagemeshError as e:
                    if header is not None:
                        self._fail(header, e)
                    break
                if not anyone:   # nobody has work, or a head is not wired yet: nobody can step
                    if header is not None:
                        self._fail(header, StageUnavailable("the DP group cannot step: the pipeline of one of its "
                                                            "replicas is not wired yet"))
                    break
                if header is None:
                    header = self.scheduler.empty_step()  # a dummy step: only the MoE collectives
                header.dp_world = self.runtime.executor.world_id
                inflight.add(asyncio.create_task(self._step(header), name=f"step-{header.step_id}"))
            if anyone or inflight:
                idle_since = loop.time()
            if not inflight:
                if not anyone:
                    deep = loop.time() - idle_since > LOCKSTEP_DEEP_IDLE_AFTER_S
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(),
                                               LOCKSTEP_DEEP_IDLE_POLL_S if deep else LOCKSTEP_IDLE_POLL_S)
                continue
            wake = asyncio.create_task(self._wake.wait())
            done, _ = await asyncio.wait(inflight | {wake}, return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            inflight -= done

    async def _wait_for_group(self, inflight: set[asyncio.Task]) -> None:
        """The group failed: fail every request here (steps in flight fail on their own),
        wait until it re-forms, then start from an empty KV pool (the stages' were rebuilt)."""
        assert self.dp is not None
        err = StageUnavailable(f"the DP group of this replica failed: {self.dp.detail}")
        for seq in self.scheduler.fail_all():
            seq.outputs.put_nowait(TokenOutput([], [], error=err))
        # steps in flight fail on their own (their world is gone) and find their requests gone
        for task in inflight:
            self._orphans.add(task)
            task.add_done_callback(self._orphans.discard)
        inflight.clear()
        while not self.dp.ready:
            self._group_changed.clear()
            if self.dp.ready:
                break
            await self._group_changed.wait()
        for seq in self.scheduler.fail_all():   # admitted meanwhile, before the check in generate
            seq.outputs.put_nowait(TokenOutput([], [], error=err))
        self.kv_imports.forget()
        self.scheduler.reset_blocks(self.scheduler.blocks.num_blocks, self.scheduler.blocks.prefix_caching)
        log.info("DP group ready again (epoch %d): serving", self.dp.epoch)

    async def _step(self, header: StepHeader) -> None:
        try:
            result = await self._run_step(header)
        except StagemeshError as e:
            if self.dp is not None:   # any step failure in a group is the group's (its peers are stuck too)
                e = StageUnavailable(f"the DP group of this replica failed: {e}")
            self._fail(header, e)
            return
        except Exception as e:  # a bug must not kill the loop and strand every request
            log.exception("step %d failed", header.step_id)
            self._fail(header, StageUnavailable(f"step failed: {e}"))
            return
        self.steps_completed += 1
        self._publish(self.scheduler.postprocess(header, result))

    async def _run_step(self, header: StepHeader) -> StepResult:
        seqs = {s.seq_id: s for s in self.scheduler.running.values()}
        input_ids = [t for s in header.seqs for t in seqs[s.seq_id].pending_token_ids()[: s.num_new]]
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self.pool, self.runtime.process, StepInputs(header, input_ids=input_ids))
        if isinstance(out, StepResult):
            return out
        fut: asyncio.Future[StepResult] = loop.create_future()
        self._pending[header.step_id] = fut
        tensors = [] if out is None else [out.hidden_states, out.residual]
        assert out is None or isinstance(out, IntermediateTensors)
        try:
            await self.transport.send(Frame(step=header, tensors=tensors))
            return await asyncio.wait_for(fut, self.step_timeout_s)
        except asyncio.TimeoutError:
            raise StageUnavailable(f"no result for step {header.step_id} within {self.step_timeout_s:.0f}s: "
                                   "a downstream stage is stalled or gone") from None
        finally:
            self._pending.pop(header.step_id, None)

    async def _read_results(self) -> None:
        while True:
            frame = await self.transport.recv()
            r = frame.result
            if r is None or r.link_lost:   # notices are the transport's business (it failed our steps)
                continue
            fut = self._pending.get(r.step_id)
            if fut is None or fut.done():
                continue
            if r.error:
                fut.set_exception(StageUnavailable(f"step {r.step_id} failed downstream: {r.error}"))
            else:
                fut.set_result(r)

    def _publish(self, outcome: StepOutcome) -> None:
        finished = {f.seq.seq_id: f.reason for f in outcome.finished}
        for seq, tok, lp, top in outcome.emitted:
            seq.outputs.put_nowait(TokenOutput(
                [tok], [lp], [top] if top else [], finish_reason=finished.get(seq.seq_id),
                num_prompt_tokens=len(seq.prompt_ids), num_output_tokens=len(seq.output_ids),
            ))

    def _fail(self, header: StepHeader, err: StagemeshError) -> None:
        log.error("step %d failed, failing its requests: %s", header.step_id, err)
        for s in header.seqs:
            seq = self.scheduler.running.get(s.seq_id)
            if seq is not None:
                self.scheduler.finish(seq)
                seq.outputs.put_nowait(TokenOutput([], [], error=err))
