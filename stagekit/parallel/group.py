"""One object per process group, in the spirit of vLLM's GroupCoordinator.

A group owns two torch.distributed groups over the same ranks: a CPU group (gloo) for
metadata and a device group (NCCL on CUDA, gloo on CPU) for tensors. Collectives return
early when the group has a single rank, so a TP=1 stage never touches torch.distributed.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class GroupCoordinator:
    """Ranks of one parallel group and the collectives over them.

    Invariant: ``ranks[rank_in_group] == global rank`` of this process, and every member
    enters every collective called on the group in the same order.
    """

    ranks: list[int]
    rank_in_group: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cpu_group: dist.ProcessGroup | None = None
    device_group: dist.ProcessGroup | None = None

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group in place (and return it)."""
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim`` (rank order)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast ``x`` from group rank ``src`` into every rank's ``x`` (same shape)."""
        if self.world_size == 1:
            return x
        dist.broadcast(x, src=self.ranks[src], group=self.device_group)
        return x

    def broadcast_object(self, obj: object = None, src: int = 0) -> object:
        """Broadcast a picklable object over the CPU group."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.ranks[src], group=self.cpu_group)
        return box[0]

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the group (over the CPU group)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)

    def close(self) -> None:
        """Leave torch.distributed. A process that exits with its gloo groups still alive
        can abort in their threads' destructors ("terminate called without an active
        exception"), so every rank closes its group before it exits."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
        self.cpu_group = self.device_group = None


def init_tp_group(
    tp_rank: int,
    tp_size: int,
    init_method: str,
    timeout_s: float = 120.0,
) -> GroupCoordinator:
    """Join the stage's TP group (world = the stage's TP ranks) and build its coordinator."""
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", tp_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    # NCCL needs one GPU per rank; ranks sharing a GPU (a one-GPU test box) use gloo, which
    # also reduces CUDA tensors, just slower.
    use_nccl = use_cuda and torch.cuda.device_count() >= tp_size
    if tp_size == 1:
        return GroupCoordinator(ranks=[0], rank_in_group=0, device=device)
    if use_cuda:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend="gloo", init_method=init_method, rank=tp_rank, world_size=tp_size, timeout=timeout
    )
    ranks = list(range(tp_size))
    cpu_group = dist.new_group(ranks, backend="gloo", timeout=timeout)
    device_group = dist.new_group(ranks, backend="nccl" if use_nccl else "gloo", timeout=timeout)
    return GroupCoordinator(
        ranks=ranks, rank_in_group=tp_rank, device=device, cpu_group=cpu_group, device_group=device_group
    )
