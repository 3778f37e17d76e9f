"""One choice of a request: route it, stream it from a replica head, detokenize, apply stop strings.

A choice whose replica fails (down, or full) before it produced a token is retried on another
healthy replica. With migration on, one that fails after producing tokens continues on another
replica too: the tokens so far are appended to the prompt and the rest of the budget is asked
for, so the client sees one unbroken stream (Dynamo's request migration). The output is
unchanged by a migration, greedy or sampled: the continuation carries the request's seed and
its output position (``seed_offset``), and a stage draws the token at output position i from
(seed, i) alone.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace

from gateway.domain import FinishReason, GenerateChunk
from gateway.errors import InternalError, ReplicaEvicted
from gateway.pool import Lease, ReplicaPool
from gateway.textstream import TextAssembler, TokenOutput
from gateway.tokenizing import TokenizerLike
from stagekit.errors import CapacityExceeded, StageUnavailable
from stagekit.types.sampling_params import SamplingParams

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


class _ChoiceState:
    """What a choice produced so far; survives moving the choice to another replica."""

    def __init__(self, tokenizer: TokenizerLike, job: ChoiceJob) -> None:
        self.job = job
        self.detok = tokenizer.detokenizer(list(job.prompt_token_ids))
        self.text = TextAssembler(job.stop)
        self.generated: list[int] = []

    def next_request(self) -> tuple[tuple[int, ...], SamplingParams]:
        """The prompt and sampling that continue the choice from where it is: the rest of its
        token budget and of its min_tokens, its next output position for the seeded draws."""
        s, done = self.job.sampling, len(self.generated)
        if not done:
            return self.job.prompt_token_ids, s
        rest = replace(s, max_tokens=s.max_tokens - done, min_tokens=max(0, s.min_tokens - done),
                       seed_offset=s.seed_offset + done)
        return self.job.prompt_token_ids + tuple(self.generated), rest

    def add(self, chunk: GenerateChunk) -> bool:
        """Take a chunk's tokens; True when a stop string ended the choice."""
        job = self.job
        for i, token_id in enumerate(chunk.token_ids):
            self.generated.append(token_id)
            logprob = chunk.logprobs[i] if i < len(chunk.logprobs) else None
            top = chunk.top_logprobs[i] if i < len(chunk.top_logprobs) else ()
            # Like vLLM, a matched stop token id ends the text without showing it.
            hidden = (
                chunk.finish_reason == FinishReason.STOP
                and i == len(chunk.token_ids) - 1
                and token_id in job.sampling.stop_token_ids
            )
            piece = "" if hidden else self.detok.push([token_id])
            can_stop = len(self.generated) >= job.sampling.min_tokens  # vLLM: min_tokens mutes stops too
            if self.text.add_token(token_id, piece, logprob, top, can_stop):
                return True
        return False


async def generate_choice(
    pool: ReplicaPool, tokenizer: TokenizerLike, job: ChoiceJob, *, migrate: bool = True
) -> AsyncIterator[ChoiceDelta]:
    state = _ChoiceState(tokenizer, job)
    tried: set[int] = set()
    visits: dict[int, int] = {}  # attempts per replica: a choice the gateway moved off one may come back
    # prefill/decode disaggregation (gateway/pd.py): the first token from a prefill replica, the
    # rest from the decode replica the prompt's KV moved to (its lease is `first`)
    handoff = pool.pd.handoff(pool, state) if pool.pd is not None else None
    first: Lease | None = None
    if handoff is not None:
        async with aclosing(handoff.run()) as deltas:
            async for delta in deltas:
                yield delta
        if handoff.finished:
            return
        first, tried = handoff.decode_lease, set(handoff.excluded)
    while True:
        prompt, sampling = state.next_request()
        lease = first or await pool.acquire(prompt, sampling.max_tokens, exclude=frozenset(tried))
        first = None
        replica = lease.replica
        tried.add(replica.index)
        visits[replica.index] = visits.get(replica.index, 0) + 1
        # back on a replica: an id of its own, which the late Abort of the earlier attempt cannot hit
        request_id = job.request_id if visits[replica.index] == 1 else f"{job.request_id}.{visits[replica.index]}"
        try:
            async with aclosing(_attempt(pool, lease, state, request_id, prompt, sampling)) as deltas:
                async for delta in deltas:
                    if handoff is not None:
                        handoff.tick(replica.role, delta)
                    yield delta
            return
        except (StageUnavailable, CapacityExceeded) as err:
            if isinstance(err, ReplicaEvicted):
                # the gateway moved it: the replica may serve it again once back (routing skips it till then)
                tried.discard(replica.index)
            elif isinstance(err, StageUnavailable):
                replica.mark_unhealthy(str(err))
            if (state.generated and not migrate) or not pool.has_other(tried):
                raise
            kind = "migration" if state.generated else "retry"
            if pool.metrics is not None:
                pool.metrics.retries.labels(kind=kind).inc()
            logger.warning(
                "%s: replica %d failed after %d token(s) (%s); %s on another replica",
                job.request_id,
                replica.index,
                len(state.generated),
                err,
                "continuing" if state.generated else "retrying",
            )
        finally:
            lease.release()


async def _attempt(
    pool: ReplicaPool, lease: Lease, state: _ChoiceState, request_id: str, prompt: tuple[int, ...],
    sampling: SamplingParams,
) -> AsyncIterator[ChoiceDelta]:
    job, replica = state.job, lease.replica
    done = False
    try:
        stream = replica.generate(request_id, prompt, sampling)
        async with aclosing(stream):
            async for chunk in stream:
                lease.consume(len(chunk.token_ids))
                if state.add(chunk):
                    # The stage would go on generating; the closing stream cancels the call and
                    # the Abort in `finally` frees its slot right away.
                    delta, tokens = state.text.release(final=True)
                    yield ChoiceDelta(job.index, delta, tokens, FinishReason.STOP.value, len(state.generated))
                    return
                if chunk.finish_reason is not None:
                    done = True
                    state.text.add_text(state.detok.flush())
                    reason = FinishReason.STOP if state.text.stopped else chunk.finish_reason
                    delta, tokens = state.text.release(final=True)
                    yield ChoiceDelta(job.index, delta, tokens, reason.value, len(state.generated))
                    return
                delta, tokens = state.text.release()
                if delta or tokens:
                    yield ChoiceDelta(job.index, delta, tokens)
        done = True
        raise InternalError(f"replica {replica.index} ended {request_id} without a finish reason")
    finally:
        if not done:
            pool.spawn(replica.abort(request_id))
