"""`GatewayState`: what request handlers share once startup wired the replicas."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request

from gateway.config import GatewayConfig
from gateway.domain import StageInfo
from gateway.metrics import GatewayMetrics
from gateway.pool import ReplicaPool
from gateway.tokenizing import TokenizerLike

if TYPE_CHECKING:
    from gateway.replica_admin import ReplicaAdmin

T = TypeVar("T")


@dataclass(slots=True)
class GatewayState:
    """The pool, the model's tokenizer and the facts handlers validate against. ``workers``
    runs a request's CPU-heavy preparation (tokenizing, chat templates) so that the event loop
    never waits on it: one large prompt must not stall every other request and ``/health``."""

    config: GatewayConfig
    pool: ReplicaPool
    tokenizer: TokenizerLike
    head_info: StageInfo
    model_name: str
    metrics: GatewayMetrics
    created: int
    workers: ThreadPoolExecutor
    admin: ReplicaAdmin | None = None  # replicas changed at runtime (admin API, replica file)

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the worker pool; its exceptions are raised here."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, fn, *args)

    @property
    def vocab_size(self) -> int:
        return self.head_info.vocab_size or self.tokenizer.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.head_info.max_model_len

    @property
    def max_prompt_chars(self) -> int | None:
        return self.config.limits.prompt_chars(self.max_model_len)

    def model_card(self) -> dict[str, Any]:
        """The served model as OpenAI's model object (plus vLLM's ``max_model_len``)."""
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "stagemesh",
            "root": self.head_info.model_name or self.model_name,
            "max_model_len": self.max_model_len,
        }


async def get_state(request: Request) -> GatewayState:
    """FastAPI dependency: the state the lifespan stored on the app (async: FastAPI would run a
    plain function in its thread pool, a measurable cost per request)."""
    return request.app.state.gateway
