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

    def all_to_all(self, x: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        if len(send_counts) != len(self.ranks) or sum(send_counts) != x.shape[0] or min(send_counts) < 0:
            raise ValueError(f"send_counts {send_counts} must give {len(self.ranks)} counts summing to "
                             f"{x.shape[0]} rows")
        counts = torch.tensor(send_counts, dtype=torch.int64, device=x.device)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.device_group)  # every rank learns what comes to it
        recv_counts = recv.tolist()
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_counts, list(send_counts), group=self.device_group)
        return out, recv_counts
