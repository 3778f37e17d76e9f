"""The Python SDK for a stagemesh gateway's gRPC ``stagemesh.v1.Generation`` API.

    from stagekit.client import GenerationClient

    with GenerationClient("127.0.0.1:8001") as client:
        for chunk in client.generate("Hello, mesh", max_tokens=16, temperature=0):
            print(chunk.text, end="", flush=True)

`AsyncGenerationClient` is the asyncio twin. Failures raise `stagekit.errors` types
(mapped from gRPC codes by `stagekit.rpc.status.error_for`) or `Unauthenticated`.
"""

from __future__ import annotations

from stagekit.client.async_client import AsyncGenerationClient, AsyncGenerationStream
from stagekit.client.errors import Unauthenticated, error_from_rpc
from stagekit.client.retry import NO_RETRY, RetryPolicy
from stagekit.client.sync_client import GenerationClient, GenerationStream
from stagekit.client.types import Choice, Chunk, Completion, GenerationRequest, Model, TopLogprob, Usage
from stagekit.errors import (
    CapacityExceeded,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    StagemeshError,
    StageUnavailable,
)

__all__ = [
    "NO_RETRY",
    "AsyncGenerationClient",
    "AsyncGenerationStream",
    "CapacityExceeded",
    "Choice",
    "Chunk",
    "Completion",
    "DeadlineExceeded",
    "GenerationClient",
    "GenerationRequest",
    "GenerationStream",
    "InvalidRequest",
    "Model",
    "NotFound",
    "RetryPolicy",
    "StageUnavailable",
    "StagemeshError",
    "TopLogprob",
    "Unauthenticated",
    "Usage",
    "error_from_rpc",
]
