"""The torch.distributed world of a process, joined once, and the groups made from it.

vLLM keeps its world and groups in module globals; here they are objects a process builds
and passes down (``ParallelGroups``), so two worlds' layers never share hidden state and a
test can build exactly the groups it needs. Groups are made for any subset of the world's
ranks (TP inside a stage today; EP or DP groups that span stages or replicas next).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable

import torch
import torch.distributed as dist

from stagekit.parallel.device_communicator import DeviceCommunicator
from stagekit.parallel.group import GroupCoordinator
from stagekit.parallel.torch_communicator import TorchCommunicator


def serve_loopback_store(world_size: int, timeout_s: float = 120.0) -> dist.TCPStore:
    """The rendezvous store rank 0 of a one-host world serves on a loopback port the OS
    picks as it binds (``store.port``): there is no window between choosing a port and
    binding it in which another process can take it, as there is with a port probed
    free beforehand. The other ranks reach it with ``dial_loopback_store``."""
    return dist.TCPStore("127.0.0.1", 0, world_size, True, datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def dial_loopback_store(port: int, world_size: int, timeout_s: float = 120.0) -> dist.TCPStore:
    """A client of the store ``serve_loopback_store`` serves on ``port``."""
    return dist.TCPStore("127.0.0.1", port, world_size, False, datetime.timedelta(seconds=timeout_s))


class ParallelWorld:
    """This process's rank in a world of ``world_size`` ranks that meet at ``init_method``.

    Invariant: every rank of the world calls ``new_group`` with the same ranks and
    communicator in the same order (torch.distributed makes groups collectively over the
    world, members or not). Groups close on their own without touching the world; ``close``
    closes the groups still open, then destroys the default group, once. A one-rank world
    never initialises torch.distributed. Rank r uses GPU ``r % device_count`` when CUDA is
    there, the CPU otherwise. The ranks meet at ``init_method`` (a ``tcp://`` address rank 0
    listens on) or, when given, through ``store`` (a rendezvous that outlives the world: a
    data-parallel group's, parallel/dp_rendezvous.py).
    """

    def __init__(self, rank: int, world_size: int, init_method: str | None, timeout_s: float = 120.0,
                 store: dist.Store | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.rank, self.world_size = rank, world_size
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.device = _device_of(rank)
        self._groups: list[GroupCoordinator] = []
        self._joined = False
        if world_size == 1:
            return
        if dist.is_initialized():
            raise RuntimeError("this process has joined a torch.distributed world already")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if store is not None:
            dist.init_process_group(backend="gloo", store=store, rank=rank, world_size=world_size,
                                    timeout=self.timeout)
        else:
            dist.init_process_group(backend="gloo", init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=self.timeout)
        self._joined = True

    def new_group(
        self, ranks: Iterable[int], communicator: type[DeviceCommunicator] = TorchCommunicator,
    ) -> GroupCoordinator | None:
        """The group of world ``ranks`` (increasing), or None on a rank outside it. Call on
        every rank of the world, in the same order everywhere (see the class invariant)."""
        ranks = list(ranks)
        if not ranks or ranks != sorted(set(ranks)) or ranks[0] < 0 or ranks[-1] >= self.world_size:
            raise ValueError(f"group ranks {ranks} must be increasing world ranks in [0, {self.world_size})")
        member = self.rank in ranks
        if len(ranks) == 1:
            return GroupCoordinator(ranks, 0, self.device) if member else None
        if not self._joined:
            raise RuntimeError("the world is closed")
        cpu_group = dist.new_group(ranks, backend="gloo", timeout=self.timeout)
        device_group = None
        if communicator.uses_device_group:
            device_group = dist.new_group(ranks, backend=_device_backend(ranks), timeout=self.timeout)
        if not member:
            return None
        rank_in_group = ranks.index(self.rank)
        try:
            comm = communicator(ranks, rank_in_group, self.device, cpu_group, device_group,
                                timeout_s=self.timeout.total_seconds())
        except BaseException:
            for pg in (device_group, cpu_group):
                if pg is not None:
                    dist.destroy_process_group(pg)
            raise
        group = GroupCoordinator(ranks, rank_in_group, self.device, cpu_group, device_group, comm)
        self._groups.append(group)
        return group

    def close(self) -> None:
        """Close every group made here, then leave torch.distributed. Every rank calls this
        before it exits: a process that exits with gloo groups alive can abort in their
        threads' destructors ("terminate called without an active exception")."""
        for group in self._groups:
            group.close()
        self._groups.clear()
        if self._joined and dist.is_initialized():
            dist.destroy_process_group()
        self._joined = False

    def __enter__(self) -> ParallelWorld:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _device_of(rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _device_backend(ranks: list[int]) -> str:
    # NCCL needs one GPU per rank; ranks sharing a GPU (a one-GPU test box) use gloo, which
    # also reduces CUDA tensors, just slower.
    if torch.cuda.is_available() and len({r % torch.cuda.device_count() for r in ranks}) == len(ranks):
        return "nccl"
    return "gloo"
