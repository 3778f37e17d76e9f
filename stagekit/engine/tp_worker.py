"""Main loop of TP ranks 1..t-1: wait for rank 0's next message (tp_messages) on its
shared-memory ring, or on the pipe where rank 0 has no ring, and act on it: run a step (its
tensors arrive by broadcast), or read / write KV blocks for a KV transfer
(``TPExecutor.read_kv`` / ``write_kv``). Exits when rank 0 says stop or goes away (the ring
sees its process exit, the pipe closes: EOFError either way), so no worker outlives its
stage. Start-up results always go back over the pipe."""

from __future__ import annotations

import os
import traceback
from multiprocessing.connection import Connection

import torch

from stagekit.engine.model_runner import ModelRunner
from stagekit.engine.stage_spec import StageSpec
from stagekit.engine.stage_world import group_member, join_group_world, join_stage_world
from stagekit.engine.startup_heap import freeze_startup_heap
from stagekit.engine.tp_messages import ReadKv, RunStep, Stop, TensorsMeta, WorkerFailed, WorkerReady, WriteKv
from stagekit.parallel.dp_rendezvous import DpRendezvous
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.parallel_world import dial_loopback_store
from stagekit.parallel.shm_broadcaster import ShmBroadcastReader
from stagekit.types.step import IntermediateTensors


def worker_main(spec: StageSpec, rank: int, store_port: int, conn: Connection, ring: str | None = None) -> None:
    """TP rank ``rank`` of the stage ``spec``: joins the stage's world at rank 0's store on
    ``store_port`` (or its DP group's), then serves the steps rank 0 sends."""
    try:
        if spec.dp_size > 1:   # a DP group's world: this rank knocks at the group's rendezvous itself
            # kept open for the process's life: the world's store is the rendezvous's connection
            rendezvous = DpRendezvous(spec.dp_group, group_member(spec, rank, os.getpid()), spec.dp_size,
                                      timeout_s=spec.collective_timeout_s)
            world, groups, _, _ = join_group_world(spec, rendezvous)
        else:
            store = dial_loopback_store(store_port, spec.tp_size)
            world, groups = join_stage_world(rank, spec.tp_size, store, collectives=spec.collectives,
                                             moe_parallel=spec.moe_parallel, moe_dispatch=spec.moe_dispatch)
    except Exception as e:  # reported to rank 0, which fails the stage's start-up with it
        conn.send(WorkerFailed(f"{type(e).__name__}: {e}"))
        return
    try:
        try:
            # rank 0 spawned this process and unlinks the ring's name once every worker is ready
            inbox = conn if ring is None else ShmBroadcastReader.attach(ring, rank - 1, os.getppid())
            runner = ModelRunner(spec, groups)
        except Exception as e:
            conn.send(WorkerFailed(f"{type(e).__name__}: {e}"))
            return
        freeze_startup_heap()
        conn.send(WorkerReady())
        _serve(runner, groups.tp, inbox)
    finally:
        world.close()


def _serve(runner: ModelRunner, tp: GroupCoordinator, inbox: Connection | ShmBroadcastReader) -> None:
    while True:
        try:
            msg = inbox.recv()
        except (EOFError, OSError):
            return
        match msg:
            case RunStep(step=step, tensors=meta):
                if meta is not None:
                    step.intermediate = _receive(tp, meta)
                try:
                    runner.run(step)
                except Exception:
                    traceback.print_exc()
                    return
            case ReadKv(blocks=blocks):     # this rank's KV of the blocks, gathered to rank 0
                tp.all_gather(runner.kv_cache.read_blocks(blocks).unsqueeze(0), dim=0)
            case WriteKv(blocks=blocks, shape=shape, dtype=dtype):  # every rank's KV; keep this rank's
                full = tp.broadcast(torch.empty(shape, dtype=dtype, device=tp.device))
                runner.kv_cache.write_blocks(blocks, full[tp.rank_in_group])
            case Stop():
                return
            case _:
                raise TypeError(f"unknown message from TP rank 0: {type(msg).__name__}")


def _receive(tp: GroupCoordinator, meta: TensorsMeta) -> IntermediateTensors:
    """The step's tensors from rank 0's broadcasts (``TPExecutor.execute`` sends them)."""
    hidden = tp.broadcast(torch.empty(meta.shape, dtype=meta.dtype, device=tp.device))
    residual = tp.broadcast(torch.empty(meta.shape, dtype=meta.dtype, device=tp.device)) if meta.has_residual else None
    return IntermediateTensors(hidden, residual)
