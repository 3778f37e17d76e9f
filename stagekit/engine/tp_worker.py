"""Main loop of TP ranks 1..t-1: wait for rank 0's step metadata on the pipe, receive
the step's tensors from the broadcast, run the same forward; or read / write KV blocks
for a KV transfer (``TPExecutor.read_kv`` / ``write_kv``). Exits when rank 0 says stop
or its end of the pipe closes (rank 0 died), so no worker outlives its stage."""

from __future__ import annotations

import traceback
from multiprocessing.connection import Connection

import torch

from stagekit.engine.model_runner import ModelRunner
from stagekit.engine.stage_spec import StageSpec
from stagekit.engine.stage_world import join_stage_world
from stagekit.engine.startup_heap import freeze_startup_heap
from stagekit.parallel.group import GroupCoordinator
from stagekit.types.step import IntermediateTensors


def worker_main(spec: StageSpec, rank: int, init_method: str, conn: Connection) -> None:
    try:
        world, groups = join_stage_world(rank, spec.tp_size, init_method)
    except Exception as e:  # reported to rank 0, which fails the stage's start-up with it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    try:
        try:
            runner = ModelRunner(spec, groups)
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))
            return
        freeze_startup_heap()
        conn.send(("ready", None))
        _serve(runner, groups.tp, conn)
    finally:
        world.close()


def _serve(runner: ModelRunner, group: GroupCoordinator, conn: Connection) -> None:
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        if msg[0] == "kv_read":     # this rank's KV of the blocks, gathered to rank 0
            group.all_gather(runner.kv_cache.read_blocks(msg[1]).unsqueeze(0), dim=0)
            continue
        if msg[0] == "kv_write":    # every rank's KV from rank 0; this rank keeps its own
            _, blocks, shape, dtype = msg
            full = group.broadcast(torch.empty(shape, dtype=dtype, device=group.device))
            runner.kv_cache.write_blocks(blocks, full[group.rank_in_group])
            continue
        _, seqs, freed, input_ids, meta, preempted = msg
        intermediate = None
        if meta is not None:
            shape, dtype, has_residual = meta
            hidden = group.broadcast(torch.empty(shape, dtype=dtype, device=group.device))
            residual = group.broadcast(torch.empty(shape, dtype=dtype, device=group.device)) if has_residual else None
            intermediate = IntermediateTensors(hidden, residual)
        try:
            runner.run(seqs, freed, input_ids, intermediate, preempted)
        except Exception:
            traceback.print_exc()
            return
