"""Groups over any subset of a world's ranks: 3 gloo processes join one world and make two
overlapping groups that are not the whole world ([0, 2] and [1, 2]); each group's
collectives see only its own ranks, closing one leaves the other and the world working, and
every process closes the world and exits 0 (gloo groups left alive at exit can abort)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.parallel_world import ParallelWorld
from tests.helpers.rendezvous import rendezvous_url

WORLD = 3


def _check_group(group: GroupCoordinator, rank: int) -> None:
    """all_reduce / all_gather / broadcast over ``group``, whose members are world ranks."""
    assert group.ranks[group.rank_in_group] == rank
    x = torch.tensor([float(rank + 1)])
    assert group.all_reduce(x) is x
    assert x.item() == sum(r + 1 for r in group.ranks)
    gathered = group.all_gather(torch.tensor([[float(rank)]]), dim=1)  # [1, group size]
    assert gathered.tolist() == [[float(r) for r in group.ranks]]
    src = group.world_size - 1    # a group rank, not a world rank
    y = torch.full((2, 2), float(rank))
    group.broadcast(y, src=src)
    assert torch.equal(y, torch.full((2, 2), float(group.ranks[src])))
    assert group.broadcast_object(f"from {rank}", src=src) == f"from {group.ranks[src]}"
    assert group.min_int(10 + rank) == 10 + group.ranks[0]


def _rank(rank: int, init_method: str) -> None:
    torch.set_num_threads(1)
    world = ParallelWorld(rank, WORLD, init_method)
    a = world.new_group([0, 2])
    b = world.new_group([1, 2])
    solo = world.new_group([1])
    members = [(True, False, False), (False, True, True), (True, True, False)]  # a, b, solo on ranks 0, 1, 2
    assert (a is not None, b is not None, solo is not None) == members[rank]
    if a is not None:
        assert a.rank_in_group == [0, 2].index(rank)
        _check_group(a, rank)
    if b is not None:
        assert b.rank_in_group == [1, 2].index(rank)
        _check_group(b, rank)
    if solo is not None:  # a one-rank group never calls torch.distributed
        assert solo.rank_in_group == 0 and solo.communicator is None
        x = torch.tensor([5.0])
        assert solo.all_reduce(x).item() == 5.0 and solo.all_gather(x).tolist() == [5.0]

    if a is not None:
        a.close()
        a.close()  # idempotent
        assert a.cpu_group is None and dist.is_initialized()
        with pytest.raises(RuntimeError, match="no communicator"):
            a.all_reduce(torch.ones(1))
    if b is not None:  # rank 2 closed a: b still works
        _check_group(b, rank)
    # the world outlives its groups: a new group over all of it still forms and reduces
    everyone = world.new_group(range(WORLD))
    assert everyone is not None
    _check_group(everyone, rank)
    everyone.barrier()
    world.close()
    assert not dist.is_initialized()
    world.close()  # idempotent


def test_groups_over_subsets_of_a_world(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(rendezvous_url(tmp_path),), nprocs=WORLD, join=True)


def test_one_rank_world_stays_out_of_torch_distributed() -> None:
    with ParallelWorld(0, 1, "") as world:
        group = world.new_group([0])
        assert group is not None and group.world_size == 1
        x = torch.arange(3.0)
        assert group.broadcast(x) is x and group.min_int(4) == 4
        assert not dist.is_initialized()


def test_group_ranks_are_checked() -> None:
    world = ParallelWorld(0, 1, "")
    for bad in ([], [0, 0], [1], [-1]):
        with pytest.raises(ValueError, match="increasing world ranks"):
            world.new_group(bad)
