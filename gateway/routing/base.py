"""What a routing policy sees of a replica, and the `Router` seam."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Candidate(Protocol):
    """A replica as routers see it: its index and the load the gateway has put on it."""

    @property
    def index(self) -> int: ...

    @property
    def load(self) -> int:
        """Requests running or waiting on this replica."""
        ...

    @property
    def outstanding_tokens(self) -> int: ...


class Router(Protocol):
    policy: str

    def pick(self, candidates: Sequence[Candidate], prompt_token_ids: Sequence[int]) -> Candidate:
        """One of ``candidates`` (never empty) for a request with this prompt."""
        ...


def least_loaded(candidates: Sequence[Candidate], start: int = 0) -> Candidate:
    """The candidate with the fewest requests, then the fewest outstanding tokens; ties go
    to the first one at or after position ``start`` (so equal replicas take turns)."""
    n = len(candidates)
    order = sorted(range(n), key=lambda i: (candidates[i].load, candidates[i].outstanding_tokens, (i - start) % n))
    return candidates[order[0]]
