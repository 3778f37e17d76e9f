"""The seam between a group and whatever moves its tensors.

A GroupCoordinator hands its tensor collectives to one DeviceCommunicator, chosen when the
group is made (``ParallelWorld.new_group(ranks, communicator=...)``): torch.distributed
today (``TorchCommunicator``), a shared-memory ring or a custom all-reduce later. The
metadata collectives (objects, barriers) stay on the group's gloo CPU group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.distributed as dist


class DeviceCommunicator(ABC):
    """Tensor collectives over the ranks of one group, addressed by group rank.

    Invariant: built once on every member of its group after the group's process groups
    exist, and every member calls the same operations in the same order with tensors of the
    same shape and dtype. It never owns the process groups it is given (its group destroys
    them); ``close`` releases only what the communicator made itself.
    """

    # False for a communicator that moves tensors without torch.distributed (shared memory):
    # the world then makes no device group for it.
    uses_device_group: bool = True

    def __init__(self, ranks: list[int], rank_in_group: int, device: torch.device,
                 cpu_group: dist.ProcessGroup, device_group: dist.ProcessGroup | None,
                 timeout_s: float = 120.0) -> None:
        self.ranks, self.rank_in_group, self.device = ranks, rank_in_group, device
        self.cpu_group, self.device_group = cpu_group, device_group
        self.timeout_s = timeout_s

    @abstractmethod
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group in place and return it."""

    @abstractmethod
    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim``, in group-rank order."""

    @abstractmethod
    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Group rank ``src``'s ``x`` copied into every rank's ``x`` (same shape); returns ``x``."""

    @abstractmethod
    def all_to_all(self, x: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Send ``send_counts[r]`` rows of ``x`` to group rank r (``x``'s rows grouped by
        destination, in rank order); returns the rows every rank sent here, in source-rank
        order, and how many came from each (the dispatch and combine of expert parallelism)."""

    def close(self) -> None:  # noqa: B027 - optional: the torch communicator holds nothing of its own
        """Release the communicator's own resources; the process groups are its group's."""
