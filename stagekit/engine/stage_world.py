"""The process groups of a stage's TP ranks: rank 0 (the stage process) and its workers
join one world of ``tp_size`` ranks and make its groups, each rank the same way."""

from __future__ import annotations

from stagekit.parallel.communicator_choice import communicator_for
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.parallel_groups import ParallelGroups
from stagekit.parallel.parallel_world import ParallelWorld

MOE_PARALLEL = ("tp", "ep")
MOE_DISPATCH = ("local", "all_to_all")


def join_stage_world(rank: int, tp_size: int, init_method: str, timeout_s: float = 120.0,
                     collectives: str = "auto", moe_parallel: str = "tp",
                     moe_dispatch: str = "local") -> tuple[ParallelWorld, ParallelGroups]:
    """Join the stage's world as TP rank ``rank`` and make its groups: one TP group of the
    whole world, its tensors moved as ``collectives`` says (communicator_choice); with
    ``moe_parallel == "ep"`` also an EP group over the same ranks, a second group with its
    own communicator (its all-reduces and all-to-alls never share buffers or sequence
    numbers with the TP group's). ``moe_dispatch`` says how MoE layers reach other ranks'
    experts (ParallelGroups.ep_all_to_all). The caller closes the world (which closes the
    groups) before it exits."""
    if moe_parallel not in MOE_PARALLEL or moe_dispatch not in MOE_DISPATCH:
        raise ValueError(f"moe_parallel {moe_parallel!r} / moe_dispatch {moe_dispatch!r}: "
                         f"one of {MOE_PARALLEL} / {MOE_DISPATCH}")
    world = ParallelWorld(rank, tp_size, init_method, timeout_s)
    try:
        comm = communicator_for(collectives, world.device)
        tp = world.new_group(range(tp_size), comm)
        ep: GroupCoordinator | None = None
        if moe_parallel == "ep":
            ep = world.new_group(range(tp_size), comm)
    except BaseException:
        world.close()
        raise
    assert tp is not None  # every rank of this world is in its TP group (and its EP group)
    return world, ParallelGroups(tp=tp, ep=ep, ep_all_to_all=moe_dispatch == "all_to_all")
