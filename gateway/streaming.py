"""Server-sent events: ``data: {json}`` chunks of a request's deltas, ending in ``data: [DONE]``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi.responses import StreamingResponse

from gateway.errors import error_body, gateway_error_body
from gateway.generation import ChoiceDelta
from gateway.request_run import RequestRun
from stagekit.errors import StagemeshError

logger = logging.getLogger("stagemesh.gateway")

Chunk = dict[str, Any]
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: Chunk | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def start_stream(run: RequestRun) -> tuple[ChoiceDelta | None, AsyncIterator[ChoiceDelta]]:
    """Start the request and wait for its first delta.

    Waiting lets failures that happen before any output (bad request, overload, no replica)
    answer with their real HTTP status instead of a 200 stream carrying an error.
    """
    deltas = run.deltas()
    try:
        first = await anext(deltas)
    except StopAsyncIteration:
        return None, deltas
    except BaseException:
        await deltas.aclose()
        raise
    return first, deltas


def sse_response(
    run: RequestRun,
    first: ChoiceDelta | None,
    deltas: AsyncIterator[ChoiceDelta],
    *,
    render: Callable[[ChoiceDelta], Chunk | None],
    head: list[Chunk] | None = None,
    tail: Callable[[], list[Chunk]] | None = None,
) -> StreamingResponse:
    """Stream ``head`` chunks, each delta through ``render`` (None skips it), then ``tail()``.

    If the client disconnects, Starlette cancels this body; closing ``deltas`` then cancels
    the stage calls and aborts their requests.
    """

    async def body() -> AsyncIterator[bytes]:
        outcome: str | BaseException = "client disconnected"
        try:
            for chunk in head or []:
                yield sse_event(chunk)
            async with aclosing(deltas):  # type: ignore[type-var]
                pending = [first] if first is not None else []
                for delta in pending:
                    if (chunk := render(delta)) is not None:
                        yield sse_event(chunk)
                async for delta in deltas:
                    if (chunk := render(delta)) is not None:
                        yield sse_event(chunk)
            for chunk in tail() if tail else []:
                yield sse_event(chunk)
            outcome = "ok"
        except StagemeshError as err:
            outcome = err
            yield sse_event(gateway_error_body(err))
        except Exception as err:
            logger.exception("%s: stream failed", run.request_id)
            outcome = err
            yield sse_event(error_body("internal error while streaming", "server_error", code="internal_error"))
        finally:
            run.finish(outcome)
        yield sse_event("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream", headers=_HEADERS)
