"""Round robin: each request to the next candidate in turn."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.routing.base import Candidate


class RoundRobinRouter:
    """Cycles through the candidates; the counter survives changes in the candidate list."""

    policy = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[Candidate], prompt_token_ids: Sequence[int]) -> Candidate:
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice
