"""Routing policy: which healthy replica serves the next request.

The pool filters out unhealthy and already-tried replicas; a `Router` only chooses among
the candidates it is given. Least-outstanding and prefix-affinity routers fit the same seam.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from gateway.replica import ReplicaClient


class Router(Protocol):
    def pick(self, candidates: Sequence[ReplicaClient], prompt_token_ids: Sequence[int]) -> ReplicaClient:
        """One of ``candidates`` (never empty) for a request with this prompt."""
        ...


class RoundRobinRouter:
    """Cycles through the candidates; the counter survives changes in the candidate list."""

    def __init__(self) -> None:
        self._next = 0

    def pick(self, candidates: Sequence[ReplicaClient], prompt_token_ids: Sequence[int]) -> ReplicaClient:
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice
