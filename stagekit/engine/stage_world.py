"""The process groups of a stage's TP ranks: rank 0 (the stage process) and its workers
join one world of ``tp_size`` ranks and make its groups, each rank the same way. A stage
of a data-parallel-attention group (``spec.dp_size > 1``) instead joins the group's world,
which spans every stage of every replica of the group (``join_group_world``)."""

from __future__ import annotations

import threading

import torch.distributed as dist

from stagekit.config.model_config import load_model_config
from stagekit.engine.stage_spec import StageSpec
from stagekit.parallel.communicator_choice import communicator_for
from stagekit.parallel.dp_rendezvous import DpRendezvous, Member, machine_id
from stagekit.parallel.dp_world import join_dp_world, world_id
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.parallel_groups import ParallelGroups
from stagekit.parallel.parallel_world import ParallelWorld

MOE_PARALLEL = ("tp", "ep")
MOE_DISPATCH = ("local", "all_to_all")


def join_stage_world(rank: int, tp_size: int, store: dist.Store | None, timeout_s: float = 120.0,
                     collectives: str = "auto", moe_parallel: str = "tp",
                     moe_dispatch: str = "local") -> tuple[ParallelWorld, ParallelGroups]:
    """Join the stage's world as TP rank ``rank`` (the ranks meet at ``store``, served by
    rank 0: parallel_world.serve_loopback_store; None for one rank) and make its groups: one TP group of the
    whole world, its tensors moved as ``collectives`` says (communicator_choice); with
    ``moe_parallel == "ep"`` also an EP group over the same ranks, a second group with its
    own communicator (its all-reduces and all-to-alls never share buffers or sequence
    numbers with the TP group's). ``moe_dispatch`` says how MoE layers reach other ranks'
    experts (ParallelGroups.ep_all_to_all). The caller closes the world (which closes the
    groups) before it exits."""
    if moe_parallel not in MOE_PARALLEL or moe_dispatch not in MOE_DISPATCH:
        raise ValueError(f"moe_parallel {moe_parallel!r} / moe_dispatch {moe_dispatch!r}: "
                         f"one of {MOE_PARALLEL} / {MOE_DISPATCH}")
    world = ParallelWorld(rank, tp_size, None, timeout_s, store=store)
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


def group_member(spec: StageSpec, tp_rank: int, pid: int) -> Member:
    """Who process ``pid`` (TP rank ``tp_rank`` of the stage ``spec`` describes) is in its DP group."""
    num_layers = load_model_config(spec.model_path, spec.model_name).num_layers
    return Member(dp_rank=spec.dp_rank, start_layer=spec.start_layer, end_layer=spec.end_layer, num_layers=num_layers,
                  tp_rank=tp_rank, tp_size=spec.tp_size, host=machine_id(), pid=pid)


def join_group_world(spec: StageSpec, rendezvous: DpRendezvous, cancel: threading.Event | None = None,
                     ) -> tuple[ParallelWorld, ParallelGroups, int, int]:
    """Wait until every member of the stage's DP group knocked at ``rendezvous``, join the
    world they form and make its groups (parallel/dp_world.py); also returns the world's
    epoch and its id (``world_id``), which the steps run in it carry."""
    formation = rendezvous.form(cancel)
    world, groups = join_dp_world(formation, spec.collective_timeout_s, spec.collectives)
    return world, groups, formation.epoch, world_id(formation)
