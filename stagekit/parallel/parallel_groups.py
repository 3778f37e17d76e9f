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
    them, None otherwise. Layers take the group they need from here, never a global.

    ``ep_all_to_all`` says how MoE layers reach experts on other ``ep`` ranks: False (the
    default) when every ``ep`` rank holds the same tokens (a stage's ranks after attention),
    so each computes its own experts' share and one all-reduce combines; True when they hold
    different tokens, which then travel to their experts' ranks and back by all-to-all.
    """

    tp: GroupCoordinator
    ep: GroupCoordinator | None = None
    dp: GroupCoordinator | None = None
    ep_all_to_all: bool = False

    @property
    def device(self) -> torch.device:
        """The device this rank computes on (every group of a rank shares it)."""
        return self.tp.device
