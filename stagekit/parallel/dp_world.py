"""The world of a data-parallel-attention group and the groups every member makes from it.

One torch.distributed world spans every process of every stage of the group's N replicas
(formed by ``parallel/dp_rendezvous.py``, global ranks stage-major). From it each process
makes, in the same order everywhere (torch.distributed makes groups collectively):

- a ``tp`` group per (replica, stage): attention and dense layers stay inside a replica;
- an ``ep`` group per stage position: the same-position stages of all replicas, N x tp
  ranks, over which the MoE layers place their experts and move tokens by all-to-all;
- one ``dp`` group of the replicas' heads (stage 0, TP rank 0): the lockstep all-reduce
  that tells every head, each step, whether any of them has work (engine/lockstep.py).

Shared memory moves a group's tensors where ``--collectives`` allows and every rank of the
group runs on this machine; torch.distributed (gloo / NCCL) otherwise, so a group may span
hosts. The world's timeout bounds every collective: a member that died or stalled turns
into an error on every rank that waits for it, never a hang.
"""

from __future__ import annotations

import zlib

from stagekit.parallel.communicator_choice import communicator_for
from stagekit.parallel.device_communicator import DeviceCommunicator
from stagekit.parallel.dp_rendezvous import Formation
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.parallel_groups import ParallelGroups
from stagekit.parallel.parallel_world import ParallelWorld
from stagekit.parallel.torch_communicator import TorchCommunicator


def join_dp_world(formation: Formation, timeout_s: float, collectives: str = "auto",
                  ) -> tuple[ParallelWorld, ParallelGroups]:
    """Join ``formation``'s world as its rank and make the group's groups (module docstring);
    returns the world and this rank's groups (``dp`` only on the heads). The caller closes
    the world, which closes the groups."""
    me = formation.members[formation.rank]
    world = ParallelWorld(formation.rank, formation.world_size, None, timeout_s, store=formation.store)
    try:
        def comm(ranks: list[int]) -> type[DeviceCommunicator]:
            one_host = len({formation.members[r].host for r in ranks}) == 1
            return communicator_for(collectives, world.device) if one_host else TorchCommunicator

        dp_size = 1 + max(m.dp_rank for m in formation.members)
        tp: GroupCoordinator | None = None
        ep: GroupCoordinator | None = None
        for start, _ in formation.stages():
            for r in range(dp_size):
                ranks = formation.tp_ranks(r, start)
                group = world.new_group(ranks, comm(ranks))
                if group is not None and (r, start) == (me.dp_rank, me.start_layer):
                    tp = group
        for start, _ in formation.stages():
            ranks = formation.ranks_of(start)
            group = world.new_group(ranks, comm(ranks))
            if group is not None and start == me.start_layer:
                ep = group
        # the lockstep moves one small integer tensor a step: the CPU group is all it needs
        dp = world.new_group(formation.head_ranks(), TorchCommunicator)
    except BaseException:
        world.close()
        raise
    assert tp is not None and ep is not None, "every rank is in its stage's TP and EP groups"
    return world, ParallelGroups(tp=tp, ep=ep, dp=dp, ep_all_to_all=True)


def world_id(formation: Formation) -> int:
    """A number naming ``formation``'s world, the same on every member: its epoch and its
    members' pids. Epochs restart at 1 when the rendezvous host restarts; the pids make a
    world of a restarted group differ from the one before it with the same epoch."""
    pids = ",".join(str(m.pid) for m in formation.members).encode()
    return (zlib.crc32(pids) << 24) | (formation.epoch & 0xFFFFFF)
