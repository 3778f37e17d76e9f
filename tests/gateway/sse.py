"""Reading server-sent events the way an OpenAI client does (test helper)."""

from __future__ import annotations

import json
from typing import Any

import httpx


def read_events(response: httpx.Response) -> tuple[list[dict[str, Any]], bool]:
    """The JSON payloads of a finished SSE response and whether it ended with ``[DONE]``."""
    events, done = [], False
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        assert not done, "data after [DONE]"
        if data == "[DONE]":
            done = True
        else:
            events.append(json.loads(data))
    return events, done


def post_stream(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return read_events(response)
