"""Which experts of a MoE layer a rank holds.

Experts are placed whole over the ``ep_size`` ranks of an expert-parallel group,
contiguously: rank r holds ``[r*base + min(r, rem), ...)`` with ``base, rem =
divmod(num_experts, ep_size)``, so when the count does not divide, the *first* ``rem``
ranks hold one expert more (vLLM's ``linear`` placement). A stage refuses that case at
start-up (``check_expert_parallel``); the layers keep supporting it for a future placement
that balances load rather than counts. With ``ep_size == 1`` a rank holds every expert
(the ``tp`` mode, where each expert is split instead).
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


def expert_owner(num_experts: int, ep_size: int) -> list[int]:
    """The EP rank holding each expert, by expert id: the placement map inverted."""
    owner = [0] * num_experts
    for rank, held in enumerate(placement_map(num_experts, ep_size)):
        for expert in held:
            owner[expert] = rank
    return owner


def check_moe_parallel(moe_parallel: str, num_experts: int, ep_size: int, model: str = "the model",
                       ranks: str = "") -> None:
    """ConfigError unless ``moe_parallel`` can work for ``model`` with ``num_experts``
    experts (0: dense) over a stage of ``ep_size`` ranks: ``ep`` needs experts, at most
    one rank per expert, and an even split (docs/ARCHITECTURE.md says why uneven is refused).
    ``ranks`` says where the EP ranks come from (default ``--tp N``)."""
    ranks = ranks or f"--tp {ep_size}"
    if moe_parallel not in ("tp", "ep"):
        raise ConfigError(f"--moe-parallel must be tp or ep, got {moe_parallel!r}")
    if moe_parallel == "tp":
        return
    if num_experts == 0:
        raise ConfigError(f"--moe-parallel ep: {model} has no experts (a dense model); leave it at tp")
    if ep_size > num_experts:
        raise ConfigError(f"--moe-parallel ep: {ep_size} expert-parallel ranks ({ranks}) but {model} has "
                          f"only {num_experts} experts (at most {num_experts} ranks)")
    if num_experts % ep_size:
        fits = [n for n in range(2, num_experts + 1) if num_experts % n == 0]
        raise ConfigError(f"--moe-parallel ep: {num_experts} experts of {model} do not divide over {ep_size} "
                          f"ranks ({ranks}); sizes that divide: {', '.join(map(str, fits))}, "
                          "or use --moe-parallel tp")
