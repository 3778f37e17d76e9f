"""How many tokens each expert of a MoE layer has received: the input to expert rebalancing."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ExpertLoad:
    """Tokens routed to each expert of global layer ``layer`` since the stage started,
    ``tokens[e]`` for expert e (a token with top-k routing counts once at each of its k
    experts). Counts only grow."""

    layer: int
    tokens: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.tokens)

    @property
    def imbalance(self) -> float:
        """max / mean over the experts: 1.0 is perfectly even, ``num_experts`` is every token
        at one expert; 0.0 before any token (vLLM's EPLB reports the inverse, mean / max)."""
        total = self.total
        return max(self.tokens) * len(self.tokens) / total if total else 0.0
