"""Least loaded: the replica with the fewest outstanding requests, then tokens."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.routing.base import Candidate, least_loaded


class LeastLoadedRouter:
    """Join-the-shortest-queue over what the gateway itself has in flight per replica.

    The gateway sees every request it sent, so its own counts are exact and fresh, unlike
    the stage's running/waiting numbers that probes fetch every few seconds. Ties rotate.
    """

    policy = "least_loaded"

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Sequence[Candidate], prompt_token_ids: Sequence[int]) -> Candidate:
        choice = least_loaded(candidates, self._turn)
        self._turn += 1
        return choice
