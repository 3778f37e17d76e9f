"""The groups a rank's layers compute in, passed to them explicitly."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stagekit.parallel.group import GroupCoordinator


@dataclass(frozen=True, slots=True)
class ParallelGroups:
    """One rank's groups along each parallel axis, made from its ParallelWorld: ``tp`` (the
    stage's tensor-parallel ranks, a one-rank group when TP=1) always; ``ep`` (expert
    parallel) and ``dp`` (data-parallel attention) only where a model or deployment uses
    them, None otherwise. Layers take the group they need from here, never a global."""

    tp: GroupCoordinator
    ep: GroupCoordinator | None = None
    dp: GroupCoordinator | None = None

    @property
    def device(self) -> torch.device:
        """The device this rank computes on (every group of a rank shares it)."""
        return self.tp.device
