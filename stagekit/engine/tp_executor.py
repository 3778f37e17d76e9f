"""Rank 0 of a stage drives its TP ranks.

Rank 0 lives in the stage's gRPC process; ranks 1..t-1 are worker processes it spawns.
Each step, rank 0 sends the step without its tensors (a ``RunStep``, tp_messages.py) to
every worker, pickled once, through a shared-memory ring (parallel/shm_broadcaster.py) or,
where its native library is unavailable (``STAGEMESH_NATIVE_KERNELS=0``, no compiler), over
a pipe per worker; not over a collective, so idle workers can wait forever and notice when
rank 0 dies (EOF either way). Then it broadcasts the input tensors over the TP group, every
rank runs the same forward and the layers' collectives keep them in lockstep. Only rank 0
keeps outputs. The pipes stay in both cases for start-up (ready or failed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import threading
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

import torch

from stagekit.engine.model_runner import ModelRunner
from stagekit.engine.stage_spec import StageSpec
from stagekit.engine.stage_world import join_group_world, join_stage_world
from stagekit.engine.tp_messages import ReadKv, RunStep, Stop, TensorsMeta, ToWorker, WorkerReady, WriteKv
from stagekit.engine.tp_worker import worker_main
from stagekit.errors import StageUnavailable
from stagekit.parallel.dp_rendezvous import DpRendezvous
from stagekit.parallel.parallel_world import serve_loopback_store
from stagekit.parallel.shm_broadcaster import ShmBroadcaster
from stagekit.types.step import IntermediateTensors, StepInputs

log = logging.getLogger(__name__)


class TPExecutor:
    """Runs steps on all TP ranks of a stage; ``execute`` returns rank 0's output."""

    def __init__(self, spec: StageSpec, startup_timeout_s: float = 600.0, rendezvous: DpRendezvous | None = None,
                 cancel: threading.Event | None = None) -> None:
        """``rendezvous``: where a stage of a DP-attention group (``spec.dp_size > 1``) meets
        its group (every TP rank knocks there; ``cancel`` stops the wait); the ranks then
        join the group's world: ``epoch`` counts its formations, ``world_id`` names it."""
        self.spec = spec
        self.epoch = self.world_id = 0
        self._conns: list[Connection] = []
        self._procs: list[mp.Process] = []
        self._stopping = False  # set by shutdown: workers that exit from then on were told to
        self._ring = ShmBroadcaster.create(spec.tp_size - 1) if spec.tp_size > 1 else None
        # the world's rendezvous, bound before any worker dials it (a DP group meets elsewhere)
        self._store = serve_loopback_store(spec.tp_size) if spec.tp_size > 1 and spec.dp_size <= 1 else None
        store_port = 0 if self._store is None else self._store.port
        ctx = mp.get_context("spawn")
        for rank in range(1, spec.tp_size):
            parent, child = ctx.Pipe()
            ring = None if self._ring is None else self._ring.name
            p = ctx.Process(target=worker_main, args=(spec, rank, store_port, child, ring), daemon=True,
                            name=f"stagemesh-tp{rank}")
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)
        if self._ring is not None:
            self._ring.watch([p.pid for p in self._procs])
        try:
            if rendezvous is not None:
                self.world, self.groups, self.epoch, self.world_id = join_group_world(spec, rendezvous, cancel)
            else:
                self.world, self.groups = join_stage_world(0, spec.tp_size, self._store, collectives=spec.collectives,
                                                           moe_parallel=spec.moe_parallel,
                                                           moe_dispatch=spec.moe_dispatch)
            self.runner = ModelRunner(spec, self.groups)
            for rank, conn in enumerate(self._conns, start=1):
                if not conn.poll(startup_timeout_s):
                    raise StageUnavailable(f"TP rank {rank} did not start within {startup_timeout_s:.0f}s")
                reply = conn.recv()
                if not isinstance(reply, WorkerReady):
                    raise StageUnavailable(f"TP rank {rank} failed to start: {reply.detail}")
        except BaseException:
            self.shutdown()
            raise
        if self._ring is not None:
            self._ring.unlink()  # every worker mapped it before it said ready
        if self._conns:
            log.info("steps to TP workers: %s", "shared-memory ring" if self._ring is not None else "pipes")
        comm = self.groups.tp.communicator
        log.info("stage layers %d:%d ready on %d TP rank(s), TP collectives: %s", spec.start_layer, spec.end_layer,
                 spec.tp_size, "none (one rank)" if comm is None else type(comm).__name__)
        if spec.dp_size > 1:
            ep = self.groups.ep
            ep_comm = None if ep is None else ep.communicator
            log.info("DP group %s epoch %d: replica %d of %d, experts over %d EP ranks, EP collectives: %s",
                     spec.dp_group, self.epoch, spec.dp_rank, spec.dp_size, ep.world_size if ep else 1,
                     "none (one rank)" if ep_comm is None else type(ep_comm).__name__)
        elif self.runner.cfg.num_experts and spec.tp_size > 1:
            log.info("MoE experts: %s", "split over the TP ranks (tp)" if spec.moe_parallel == "tp" else
                     f"placed whole over {spec.tp_size} EP ranks (ep), {spec.moe_dispatch} dispatch")

    def execute(self, step: StepInputs) -> IntermediateTensors | torch.Tensor | None:
        """Run ``step`` on every rank; rank 0's output (see ``ModelRunner.run``)."""
        if self._conns:
            inter = step.intermediate if step.header.seqs else None
            meta = None if inter is None else TensorsMeta.of(inter)
            # the step without its tensors: they follow over the TP group, not the pipe
            self._tell(RunStep(dataclasses.replace(step, intermediate=None), meta))
            if inter is not None:
                tp = self.groups.tp
                tp.broadcast(inter.hidden_states.contiguous())
                if inter.residual is not None:
                    tp.broadcast(inter.residual.contiguous())
        try:
            return self.runner.run(step)
        except RuntimeError as e:
            if self._conns and not all(p.is_alive() for p in self._procs):
                raise StageUnavailable(f"a TP rank of this stage died: {e}") from e
            raise

    def dead_workers(self) -> list[tuple[int, int | None, int | None]]:
        """(rank, pid, exit code) of each TP worker process that has exited: the stage cannot run
        a step without it (its shards and its KV are gone with it)."""
        if self._stopping:  # its workers are told to exit: not a loss
            return []
        return [(rank, p.pid, p.exitcode) for rank, p in enumerate(self._procs, start=1) if not p.is_alive()]

    def read_kv(self, blocks: list[int]) -> torch.Tensor:
        """Every rank's KV of ``blocks``, on the host in rank order:
        [tp, layers, 2, n, kv_heads per rank, block_size, head_dim]. Call on the thread that runs
        the steps (the ranks' collectives must come in the same order everywhere)."""
        self._tell(ReadKv(blocks))
        local = self.runner.kv_cache.read_blocks(blocks)
        return self.groups.tp.all_gather(local.unsqueeze(0), dim=0).cpu()

    def write_kv(self, blocks: list[int], data: torch.Tensor) -> None:
        """Write ``data`` ([tp, layers, 2, n, kv_heads per rank, block_size, head_dim], rank
        order, as ``read_kv`` gives it) into ``blocks`` of every rank's pool (same thread rule)."""
        tp = self.groups.tp
        if data.shape[0] != tp.world_size:
            raise ValueError(f"KV of {data.shape[0]} TP ranks for a stage of {tp.world_size}")
        self._tell(WriteKv(blocks, tuple(data.shape), data.dtype))
        full = tp.broadcast(data.to(tp.device).contiguous())
        self.runner.kv_cache.write_blocks(blocks, full[0])

    def _tell(self, msg: ToWorker) -> None:
        data = ForkingPickler.dumps(msg)  # what Connection.send does, once for all workers
        if self._ring is not None:
            self._ring.send_bytes(data)  # StageUnavailable if a worker exited and left the ring full
            return
        for rank, conn in enumerate(self._conns, start=1):
            try:
                conn.send_bytes(data)
            except (BrokenPipeError, OSError) as e:
                raise StageUnavailable(f"TP rank {rank} is gone: {e}") from e

    def shutdown(self) -> None:
        self._stopping = True
        ring, self._ring = getattr(self, "_ring", None), None
        if ring is not None:
            with contextlib.suppress(StageUnavailable):  # a worker that is gone is killed below anyway
                ring.send_bytes(ForkingPickler.dumps(Stop()), timeout_s=5.0)
        for conn in self._conns if ring is None else []:
            try:
                conn.send(Stop())
            except OSError:
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._conns, self._procs = [], []
        if ring is not None:
            ring.close()
        world = getattr(self, "world", None)
        if world is not None:
            world.close()
