"""The process groups of a stage's TP ranks: rank 0 (the stage process) and its workers
join one world of ``tp_size`` ranks and make its groups, each rank the same way."""

from __future__ import annotations

from stagekit.parallel.communicator_choice import communicator_for
from stagekit.parallel.parallel_groups import ParallelGroups
from stagekit.parallel.parallel_world import ParallelWorld


def join_stage_world(rank: int, tp_size: int, init_method: str, timeout_s: float = 120.0,
                     collectives: str = "auto") -> tuple[ParallelWorld, ParallelGroups]:
    """Join the stage's world as TP rank ``rank`` and make its groups: today one TP group of
    the whole world, its tensors moved as ``collectives`` says (communicator_choice). The
    caller closes the world (which closes the groups) before it exits."""
    world = ParallelWorld(rank, tp_size, init_method, timeout_s)
    try:
        tp = world.new_group(range(tp_size), communicator_for(collectives, world.device))
    except BaseException:
        world.close()
        raise
    assert tp is not None  # every rank of this world is in its TP group
    return world, ParallelGroups(tp=tp)
