"""`PrefixIndex`: which token prefixes the gateway sent to which replica (approximately)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixIndex:
    """Per replica, the chained hashes of the fixed-size token blocks of prompts it served.

    Block ``i`` of a prompt is known by the hash of (block ``i-1``'s hash, its tokens), so
    a hit on block ``i`` means the whole prefix up to it matched: matching walks blocks from
    the start and stops at the first unknown one, like a radix tree walk. Each replica keeps
    at most ``max_blocks`` hashes, least recently used first out, so memory is bounded. It is
    approximate in SGLang's sense: it records what was sent, not what a replica still caches;
    a replica that went down is forgotten (its KV went with it).
    """

    def __init__(self, block_size: int = 16, max_blocks: int = 65536) -> None:
        if block_size < 1 or max_blocks < 1:
            raise ValueError("block_size and max_blocks must be positive")
        self.block_size = block_size
        self.max_blocks = max_blocks
        self._blocks: dict[int, OrderedDict[int, None]] = {}

    def block_hashes(self, token_ids: Sequence[int]) -> list[int]:
        """Chained hashes of the prompt's whole blocks (a partial last block is not indexed)."""
        hashes, prev = [], 0
        bs = self.block_size
        for start in range(0, len(token_ids) - bs + 1, bs):
            prev = hash((prev, tuple(token_ids[start : start + bs])))
            hashes.append(prev)
        return hashes

    def matched_tokens(self, replica: int, hashes: Sequence[int]) -> int:
        """Tokens of the prompt's prefix this replica served before."""
        known = self._blocks.get(replica)
        if not known:
            return 0
        n = 0
        for h in hashes:
            if h not in known:
                break
            n += 1
        return n * self.block_size

    def insert(self, replica: int, hashes: Sequence[int]) -> None:
        known = self._blocks.setdefault(replica, OrderedDict())
        for h in hashes:
            known[h] = None
            known.move_to_end(h)
        while len(known) > self.max_blocks:
            known.popitem(last=False)

    def size(self, replica: int) -> int:
        """Blocks indexed for the replica (SGLang's "tree size")."""
        return len(self._blocks.get(replica, ()))

    def forget(self, replica: int) -> None:
        self._blocks.pop(replica, None)
