"""`BodyLimitMiddleware`: refuse request bodies above a size with 413 before reading them whole."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import PayloadTooLarge, face_of, gateway_error_body


class BodyLimitMiddleware:
    """Bodies above ``max_bytes`` get 413: at once when ``Content-Length`` says so, otherwise
    as soon as the streamed body passes the limit (so memory stays bounded either way)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than this gateway's limit of {self.max_bytes} bytes.")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            err = self._error()
            body = json.dumps(gateway_error_body(err)).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": face_of(err).status_code, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI turns anything but an HTTPException raised while reading into a 400.
                    raise HTTPException(413, str(self._error()))
            return message

        await self.app(scope, counting_receive, send)
