"""Prefix (cache-aware) routing: shared prefixes go where they were served, unless load says no."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.routing.base import Candidate, least_loaded
from gateway.routing.prefix_index import PrefixIndex


class PrefixRouter:
    """SGLang's cache-aware policy over a `PrefixIndex`.

    1. Load first: when the candidates are imbalanced, i.e. ``max - min > balance_abs`` and
       ``max > min * balance_rel`` (requests in flight), the least loaded one wins.
    2. Otherwise the replica that served the longest prefix of this prompt wins, if that
       prefix is more than ``cache_threshold`` of the prompt (ties: lower load).
    3. Otherwise the least loaded replica, ties to the one with the fewest indexed blocks
       (the most room for new prefixes), then in turn.

    The pool records the chosen replica's blocks in the index after every decision, whatever
    the policy, so prefix hits can be compared across policies.
    """

    policy = "prefix"

    def __init__(
        self,
        index: PrefixIndex,
        *,
        cache_threshold: float = 0.5,
        balance_abs: int = 32,
        balance_rel: float = 1.0001,
    ) -> None:
        self.index = index
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self._turn = 0

    def pick(self, candidates: Sequence[Candidate], prompt_token_ids: Sequence[int]) -> Candidate:
        self._turn += 1
        loads = [c.load for c in candidates]
        lo, hi = min(loads), max(loads)
        if hi - lo > self.balance_abs and hi > lo * self.balance_rel:
            return least_loaded(candidates, self._turn)
        hashes = self.index.block_hashes(prompt_token_ids)
        matched = [self.index.matched_tokens(c.index, hashes) for c in candidates]
        best = max(matched)
        if prompt_token_ids and best / len(prompt_token_ids) > self.cache_threshold:
            ranked = sorted(range(len(candidates)), key=lambda i: (-matched[i], loads[i]))
            return candidates[ranked[0]]
        n = len(candidates)
        ranked = sorted(range(n), key=lambda i: (loads[i], self.index.size(candidates[i].index), (i - self._turn) % n))
        return candidates[ranked[0]]
