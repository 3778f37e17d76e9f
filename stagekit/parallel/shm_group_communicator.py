"""A group's tensors through shared memory: the ShmCommunicator behind the DeviceCommunicator seam.

The segment is set up over the group's gloo CPU group (``all_gather_object`` is the
bootstrap exchange), so a group made with this communicator needs no device group. The
dtypes shared memory does not sum (integers) are summed over the CPU group instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from stagekit.parallel.device_communicator import DeviceCommunicator
from stagekit.parallel.shm_communicator import REDUCE_DTYPES, ShmCommunicator


class ShmGroupCommunicator(DeviceCommunicator):
    """Collectives of a group whose ranks share a host and compute on the CPU.

    Invariant: the same as ShmCommunicator's (same collectives, shapes and order on every
    rank); results are identical bytes on every rank, sums in group-rank order in fp32.
    """

    uses_device_group = False

    def __init__(self, ranks: list[int], rank_in_group: int, device: torch.device,
                 cpu_group: dist.ProcessGroup, device_group: dist.ProcessGroup | None,
                 timeout_s: float = 120.0) -> None:
        super().__init__(ranks, rank_in_group, device, cpu_group, device_group, timeout_s)
        if device.type != "cpu":
            raise ValueError(f"shared-memory collectives move host tensors, not {device.type} ones")

        def exchange(obj: object) -> list:
            out: list = [None] * len(ranks)
            dist.all_gather_object(out, obj, group=cpu_group)
            return out

        self.shm = ShmCommunicator.create(exchange, rank_in_group, len(ranks), group_ranks=ranks,
                                          timeout_s=timeout_s)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in REDUCE_DTYPES:
            dist.all_reduce(x, group=self.cpu_group)
            return x
        return self.shm.all_reduce(x)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return self.shm.all_gather(x, dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self.shm.broadcast(x, src)

    def all_to_all(self, x: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        return self.shm.all_to_all(x, send_counts)

    def close(self) -> None:
        self.shm.close()
