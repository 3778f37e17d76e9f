"""`KvHolds` (the prefill side of a prefill/decode hand-off) over a real block manager: a hold
pins the prompt's cached blocks until released or until its lease runs out, exactly once, and
never touches a pool that replaced the one it pinned."""

from __future__ import annotations

import asyncio

from services.stage.kv_holds import KvHolds
from stagekit.engine.block_manager import BlockManager
from stagekit.engine.prefix_cache import block_hashes


class _Engine:
    """The two engine accessors a hold uses, over one block manager."""

    def __init__(self) -> None:
        self.blocks = BlockManager(8, 4)
        self.kv_pool_generation = 0

    def pin_cached_prefix(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        hashes = block_hashes(token_ids, 4)
        blocks = self.blocks.match(hashes)
        self.blocks.take(blocks)
        return hashes, blocks

    def unpin(self, blocks: list[int]) -> None:
        self.blocks.release(blocks)


def _cached_prompt(engine: _Engine) -> list[int]:
    """A prompt of 10 tokens whose two full blocks are cached (computed and finished)."""
    prompt = list(range(10, 20))
    blocks = engine.blocks.allocate(2)
    for b, h in zip(blocks, block_hashes(prompt, 4), strict=True):
        engine.blocks.register(b, h)
    engine.blocks.release(blocks)
    return prompt


def test_a_hold_pins_until_released_or_its_lease_runs_out() -> None:
    async def run() -> None:
        engine = _Engine()
        holds = KvHolds(engine)  # type: ignore[arg-type]
        prompt = _cached_prompt(engine)
        assert engine.blocks.num_used == 0
        assert holds.hold("a", prompt, lease_s=30) == 2
        assert (engine.blocks.num_used, len(holds)) == (2, 1)
        assert holds.release("a") and not holds.release("a")   # once
        assert (engine.blocks.num_used, len(holds)) == (0, 0)
        holds.hold("b", prompt, lease_s=0.05)
        assert engine.blocks.num_used == 2
        await asyncio.sleep(0.2)   # the lease ran out: released, counted
        assert (engine.blocks.num_used, len(holds), holds.expired) == (0, 0, 1)
        holds.hold("c", prompt, lease_s=30)
        engine.kv_pool_generation += 1   # the pool was replaced (re-wired with another size)
        assert holds.release("c") and engine.blocks.num_used == 2   # the old pool's pins are not released here

    asyncio.run(run())
