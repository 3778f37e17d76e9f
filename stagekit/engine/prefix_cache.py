"""Names of prompt blocks for automatic prefix caching.

Full blocks of ``block_size`` prompt tokens are named by a chained hash (a block's hash
covers every token before it), so equal hashes mean equal KV for the same model. The
head's BlockManager maps these names to KV blocks and shares them between requests.
"""

from __future__ import annotations

import hashlib

BLOCK_SIZE = 16


def block_hashes(token_ids: list[int], block_size: int = BLOCK_SIZE) -> list[int]:
    """Chained 63-bit hashes of every full block of ``token_ids``."""
    out, parent = [], b""
    for i in range(len(token_ids) // block_size):
        h = hashlib.blake2b(parent, digest_size=8)
        h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in token_ids[i * block_size:(i + 1) * block_size]))
        parent = h.digest()
        out.append(int.from_bytes(parent, "little") >> 1)
    return out
