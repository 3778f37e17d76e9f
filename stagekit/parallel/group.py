"""One object per process group, in the spirit of vLLM's GroupCoordinator.

A group of ranks made by ``ParallelWorld.new_group`` owns a gloo CPU group for metadata
(objects, barriers, a minimum over the ranks) and a DeviceCommunicator for tensors (by
default torch.distributed on a device group: NCCL on CUDA, gloo on CPU). Collectives return
early when the group has a single rank, so a TP=1 stage never touches torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from stagekit.parallel.device_communicator import DeviceCommunicator


@dataclass(eq=False)
class GroupCoordinator:
    """Ranks of one parallel group and the collectives over them.

    Invariant: ``ranks`` are world ranks in increasing order, ``ranks[rank_in_group]`` is
    this process's world rank, and every member enters every collective called on the
    group in the same order. A group's ranks need not be the whole world. ``close`` destroys
    only this group's own process groups, never the world's default group.
    """

    ranks: list[int]
    rank_in_group: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cpu_group: dist.ProcessGroup | None = None
    device_group: dist.ProcessGroup | None = None
    communicator: DeviceCommunicator | None = None

    @property
    def world_size(self) -> int:
        """The number of ranks in this group (vLLM's name for it)."""
        return len(self.ranks)

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group in place (and return it)."""
        if self.world_size == 1:
            return x
        return self._comm().all_reduce(x)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim`` (rank order)."""
        if self.world_size == 1:
            return x
        return self._comm().all_gather(x, dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Broadcast ``x`` from group rank ``src`` into every rank's ``x`` (same shape)."""
        if self.world_size == 1:
            return x
        return self._comm().broadcast(x, src)

    def all_to_all(self, x: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Send ``send_counts[r]`` rows of ``x`` (grouped by destination, rank order) to group
        rank r; returns the rows sent here, in source-rank order, and their counts per source."""
        if self.world_size == 1:
            return x, [x.shape[0]]
        return self._comm().all_to_all(x, list(send_counts))

    def broadcast_object(self, obj: object = None, src: int = 0) -> object:
        """Broadcast a picklable object over the CPU group."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.ranks[src], group=self.cpu_group)
        return box[0]

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the group (over the CPU group)."""
        return self.min_ints([value])[0]

    def min_ints(self, values: list[int]) -> list[int]:
        """Each position's smallest value over the group, in one collective (over the CPU group)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)

    def close(self) -> None:
        """Release this group's communicator and process groups; the world and its other
        groups stay usable. Local (no collective), so a rank whose peers died can still
        close; idempotent."""
        if self.communicator is not None:
            self.communicator.close()
        if dist.is_initialized():
            for pg in (self.device_group, self.cpu_group):
                if pg is not None:
                    dist.destroy_process_group(pg)
        self.cpu_group = self.device_group = self.communicator = None

    def _comm(self) -> DeviceCommunicator:
        if self.communicator is None:
            raise RuntimeError(f"group {self.ranks} has no communicator: closed, or built without process groups")
        return self.communicator
