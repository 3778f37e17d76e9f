"""One choice of a request: route it, stream it from a replica head, detokenize, apply stop strings.

A choice that fails before it showed anything (replica down or full) is retried on another
healthy replica; once text went out, the failure is the client's to see.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from gateway.domain import FinishReason, SamplingParams
from gateway.errors import InternalError, Overloaded, Unavailable
from gateway.pool import ReplicaPool
from gateway.replica import ReplicaClient
from gateway.textstream import TextAssembler, TokenOutput
from gateway.tokenizing import TokenizerLike

logger = logging.getLogger("stagemesh.gateway")


@dataclass(frozen=True, slots=True)
class ChoiceJob:
    """What one choice asks of a replica; ``request_id`` is unique per choice."""

    index: int
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """New text of a choice; the last delta has ``finish_reason`` and the token count."""

    index: int
    text: str
    tokens: tuple[TokenOutput, ...]
    finish_reason: str | None = None
    completion_tokens: int = 0


async def generate_choice(pool: ReplicaPool, tokenizer: TokenizerLike, job: ChoiceJob) -> AsyncIterator[ChoiceDelta]:
    tried: set[int] = set()
    while True:
        replica = pool.pick(job.prompt_token_ids, exclude=frozenset(tried))
        tried.add(replica.index)
        shown = False
        try:
            async for delta in _stream(pool, replica, tokenizer, job):
                shown = True
                yield delta
            return
        except (Unavailable, Overloaded) as err:
            if isinstance(err, Unavailable):
                replica.mark_unhealthy(err.message)
            others = [r for r in pool.replicas if r.healthy and r.index not in tried]
            if shown or not others:
                raise
            logger.warning("%s: replica %d failed (%s); retrying elsewhere", job.request_id, replica.index, err)


async def _stream(
    pool: ReplicaPool, replica: ReplicaClient, tokenizer: TokenizerLike, job: ChoiceJob
) -> AsyncIterator[ChoiceDelta]:
    detok = tokenizer.detokenizer(list(job.prompt_token_ids))
    text = TextAssembler(job.stop)
    num_tokens = 0
    done = False
    replica.num_in_flight += 1
    try:
        stream = replica.generate(job.request_id, job.prompt_token_ids, job.sampling)
        async with aclosing(stream):
            async for chunk in stream:
                for i, token_id in enumerate(chunk.token_ids):
                    num_tokens += 1
                    logprob = chunk.logprobs[i] if i < len(chunk.logprobs) else None
                    top = chunk.top_logprobs[i] if i < len(chunk.top_logprobs) else ()
                    # Like vLLM, a matched stop token id ends the text without showing it.
                    hidden = (
                        chunk.finish_reason == FinishReason.STOP
                        and i == len(chunk.token_ids) - 1
                        and token_id in job.sampling.stop_token_ids
                    )
                    piece = "" if hidden else detok.push([token_id])
                    can_stop = num_tokens >= job.sampling.min_tokens  # vLLM: min_tokens mutes stops too
                    if text.add_token(token_id, piece, logprob, top, can_stop):
                        break
                if text.stopped:
                    # The stage would go on generating; the closing stream cancels the call and
                    # the Abort in `finally` frees its slot right away.
                    delta, tokens = text.release(final=True)
                    yield ChoiceDelta(job.index, delta, tokens, FinishReason.STOP.value, num_tokens)
                    return
                if chunk.finish_reason is not None:
                    done = True
                    text.add_text(detok.flush())
                    reason = FinishReason.STOP if text.stopped else chunk.finish_reason
                    delta, tokens = text.release(final=True)
                    count = max(chunk.completion_tokens, num_tokens)
                    yield ChoiceDelta(job.index, delta, tokens, reason.value, count)
                    return
                delta, tokens = text.release()
                if delta or tokens:
                    yield ChoiceDelta(job.index, delta, tokens)
        done = True
        raise InternalError(f"replica {replica.index} ended {job.request_id} without a finish reason")
    finally:
        replica.num_in_flight -= 1
        if not done:
            pool.spawn(replica.abort(job.request_id))
