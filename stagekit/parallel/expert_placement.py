"""Which experts of a MoE layer a rank holds.

Experts are placed whole over the ``ep_size`` ranks of an expert-parallel group,
contiguously: rank r holds ``[r*base + min(r, rem), ...)`` with ``base, rem =
divmod(num_experts, ep_size)``, so when the count does not divide, the *first* ``rem``
ranks hold one expert more (vLLM's ``linear`` placement). With ``ep_size == 1`` a rank
holds every expert (the ``tp`` mode, where each expert is split instead).
"""

from __future__ import annotations

from stagekit.errors import ConfigError


def contiguous_placement(num_experts: int, ep_size: int, ep_rank: int) -> list[int]:
    """The global ids of the experts rank ``ep_rank`` holds, ascending."""
    if ep_size > num_experts:
        raise ConfigError(f"expert-parallel size {ep_size} is larger than the model's {num_experts} experts")
    base, rem = divmod(num_experts, ep_size)
    start = ep_rank * base + min(ep_rank, rem)
    return list(range(start, start + base + (1 if ep_rank < rem else 0)))


def placement_map(num_experts: int, ep_size: int) -> list[list[int]]:
    """Every rank's experts, by rank: the whole placement, the same on every rank."""
    return [contiguous_placement(num_experts, ep_size, r) for r in range(ep_size)]
