"""The importing head's reservations: blocks held until committed (named) or given up,
never more than the free pool, expired when nobody commits; blocks given up or expired stay
quarantined until a grace after their land-by time (a stalled stage may still write them)."""

from __future__ import annotations

import time

import pytest

from stagekit.engine.block_manager import BlockManager
from stagekit.engine.kv_imports import KvImports
from stagekit.errors import CapacityExceeded, InvalidRequest, NotFound


def test_commit_names_the_blocks_and_abort_quarantines_them() -> None:
    bm, imports = BlockManager(8, 16), KvImports(ttl_s=0.2, grace_s=0.0)
    a = bm.allocate(1)
    bm.register(a[0], 11)                                 # hash 11 is here already
    bm.release(a)
    import_id, present, blocks, land_by = imports.reserve(bm, [11, 12, 13], 16)
    assert present == 1 and len(blocks) == 2 and bm.num_free == 8 - 2
    assert time.time() < land_by <= time.time() + 0.2
    imports.commit(bm, import_id, ok=True)
    assert bm.match([11, 12, 13]) == a + blocks and bm.num_free == 8
    other, _, blocks2, _ = imports.reserve(bm, [21, 22], 16)
    imports.commit(bm, other, ok=False)
    with pytest.raises(NotFound):
        imports.commit(bm, other, ok=True)
    imports.expire(bm)
    assert bm.num_free == 8 - 2 and imports.quarantined_blocks == 2   # not before its land-by time
    time.sleep(0.25)
    imports.expire(bm)
    assert bm.match([21]) == [] and bm.num_free == 8 and imports.quarantined_blocks == 0


def test_reservations_respect_the_pool_and_expire_after_a_grace() -> None:
    bm, imports = BlockManager(4, 16), KvImports(ttl_s=0.0, grace_s=0.2)
    with pytest.raises(CapacityExceeded):
        imports.reserve(bm, [1, 2, 3, 4], 16, headroom=1)
    with pytest.raises(InvalidRequest):
        imports.reserve(bm, [1], 8)
    import_id, _, _, _ = imports.reserve(bm, [1, 2, 3], 16)
    assert bm.num_free == 1
    imports.expire(bm)                                    # nobody committed in time: quarantined
    assert bm.num_free == 1 and imports.quarantined_blocks == 3
    with pytest.raises(NotFound):
        imports.commit(bm, import_id, ok=True)
    time.sleep(0.25)
    imports.expire(bm)
    assert bm.num_free == 4
