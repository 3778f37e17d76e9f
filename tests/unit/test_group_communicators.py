"""The DeviceCommunicator seam: a group made with the shared-memory communicator gives the
same results as one made with torch.distributed (gloo) over the same ranks, for every
collective a group offers (all_to_all included, with ranks sending nothing to some peers),
integers summed over the CPU group, and identical bytes on every rank; ``--collectives``
picks the communicator (auto: shared memory for CPU ranks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from stagekit.errors import ConfigError
from stagekit.parallel.communicator_choice import communicator_for
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.parallel_world import ParallelWorld
from stagekit.parallel.shm_group_communicator import ShmGroupCommunicator
from stagekit.parallel.torch_communicator import TorchCommunicator
from tests.helpers.rendezvous import rendezvous_url

WORLD = 3


def _collectives(group: GroupCoordinator, rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(5, 33, generator=gen)
    outs = [group.all_reduce(x.clone()), group.all_reduce(x.clone().to(torch.bfloat16))]
    outs.append(group.all_reduce(torch.tensor([rank + 1, 10 * rank], dtype=torch.int64)))
    outs.append(group.all_gather(x, dim=1))
    y = torch.full((3, 4), float(rank))
    outs.append(group.broadcast(y, src=2))
    # rank r sends (r + d) % 3 rows to rank d; rank 0 sends none to itself
    counts = [(rank + d) % WORLD for d in range(WORLD)]
    rows = torch.arange(sum(counts) * 4, dtype=torch.float32).view(-1, 4) + 1000 * rank
    got, recv = group.all_to_all(rows, counts)
    assert recv == [(s + rank) % WORLD for s in range(WORLD)]
    assert got.shape == (sum(recv), 4)
    outs.append(got)
    return outs


def _rank(rank: int, init_method: str, out: dict) -> None:
    torch.set_num_threads(1)
    with ParallelWorld(rank, WORLD, init_method) as world:
        gloo = world.new_group(range(WORLD), TorchCommunicator)
        shm = world.new_group(range(WORLD), ShmGroupCommunicator)
        assert gloo is not None and shm is not None
        assert isinstance(shm.communicator, ShmGroupCommunicator) and shm.device_group is None
        a, b = _collectives(gloo, rank), _collectives(shm, rank)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if i == 0 or i == 1:   # sums: fixed rank order in fp32 vs gloo's ring: rounding only
                torch.testing.assert_close(y.float(), x.float(), rtol=1e-2 if i else 1e-6, atol=1e-2 if i else 1e-6)
            else:
                assert torch.equal(x, y), i
        out[rank] = [t.clone() for t in b]


def test_shared_memory_group_equals_gloo_group(tmp_path: Path) -> None:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(rendezvous_url(tmp_path), out), nprocs=WORLD, join=True)
        results = [out[r] for r in range(WORLD)]
    for i in (0, 1, 2, 3, 4):  # all_reduce, all_gather and broadcast: identical bytes on every rank
        assert all(torch.equal(results[0][i], results[r][i]) for r in range(WORLD)), i


def test_collectives_choice() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert communicator_for("auto", cpu) is ShmGroupCommunicator
    assert communicator_for("shm", cpu) is ShmGroupCommunicator
    assert communicator_for("gloo", cpu) is TorchCommunicator
    assert communicator_for("auto", cuda) is TorchCommunicator
    with pytest.raises(ConfigError, match="host tensors"):
        communicator_for("shm", cuda)
    with pytest.raises(ConfigError, match="--collectives must be one of"):
        communicator_for("mpi", cpu)
