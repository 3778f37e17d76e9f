"""Running the choices of one request concurrently and merging their deltas into one stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from gateway.generation import ChoiceDelta
from gateway.textstream import TokenOutput

_DONE = object()


async def merge(streams: Sequence[AsyncIterator[ChoiceDelta]]) -> AsyncIterator[ChoiceDelta]:
    """Deltas of every stream in arrival order; the first error cancels the rest and is raised.

    Closing the merged iterator early cancels every stream (which aborts their stage requests).
    """
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for delta in only:
                yield delta
        return
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump(stream: AsyncIterator[ChoiceDelta]) -> None:
        try:
            async with aclosing(stream):  # type: ignore[type-var]
                async for delta in stream:
                    await queue.put(delta)
        except Exception as err:  # handed to the consumer, which raises it
            await queue.put(err)
        else:
            await queue.put(_DONE)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()


@dataclass(slots=True)
class ChoiceResult:
    """A finished choice, assembled from its deltas."""

    index: int
    text: str = ""
    tokens: list[TokenOutput] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.tokens.extend(delta.tokens)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.completion_tokens = delta.completion_tokens
