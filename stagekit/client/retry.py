"""`RetryPolicy`: when and how long to wait before sending a failed call again."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries with capped exponential back-off and full jitter.

    Only calls that are safe to repeat are retried: ListModels always, Complete and Generate
    because generating has no side effects, and Generate only while it has not yielded a
    chunk (so the caller never sees output twice). A server's ``retry-after`` (seconds, sent
    with RESOURCE_EXHAUSTED) is honoured up to ``max_backoff_s``. Retries never outlive the
    call's deadline.
    """

    max_attempts: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    retry_codes: frozenset[grpc.StatusCode] = _RETRYABLE

    def delay(self, err: grpc.RpcError, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` (attempts count from 0), or None: give up."""
        if attempt + 1 >= self.max_attempts or err.code() not in self.retry_codes:
            return None
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt)
        wait = random.uniform(0, cap)
        hint = _retry_after(err)
        if hint is not None:
            wait = max(wait, min(hint, self.max_backoff_s))
        if deadline is not None and time.monotonic() + wait >= deadline:
            return None
        return wait


NO_RETRY = RetryPolicy(max_attempts=1)


def _retry_after(err: grpc.RpcError) -> float | None:
    trailing: Sequence[tuple[str, str]] = ()
    if callable(getattr(err, "trailing_metadata", None)):
        trailing = err.trailing_metadata() or ()
    for key, value in trailing:
        if key == "retry-after":
            try:
                return float(value)
            except ValueError:
                return None
    return None
