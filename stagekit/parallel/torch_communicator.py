"""The torch.distributed communicator: the group's device group carries the tensors
(NCCL when every rank of the group has a GPU of its own, gloo otherwise)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from stagekit.parallel.device_communicator import DeviceCommunicator


class TorchCommunicator(DeviceCommunicator):
    """Collectives of torch.distributed on the device group. torch addresses ranks by their
    world rank, so ``src`` is translated through ``ranks``."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in self.ranks]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(x, src=self.ranks[src], group=self.device_group)
        return x
