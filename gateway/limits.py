"""Request body size limit as a pure ASGI middleware (``UNLEARN_MAX_BODY_BYTES``): 413 in the OpenAI envelope.

A declared ``Content-Length`` over the limit is refused before a byte of the body is read; one within it passes
straight through (the server never delivers more than it declares), so the common case costs one header scan. A
body without one (``Transfer-Encoding: chunked``) is read here as it arrives, refused as soon as it passes the
limit, and handed to the app as one message; later ``receive`` calls go to the server, so the handlers still see
the client disconnect. Either way the app never holds more than the limit in memory.

Paths in ``exempt`` keep their own cap (the admin import takes documents up to 512 MiB and streams them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError, PayloadTooLarge


async def send_error(send: Send, error: GatewayError, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Answer with ``error`` as an OpenAI error envelope from inside a pure ASGI middleware."""
    body = json.dumps(error.envelope().model_dump()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _framing(scope: Scope) -> tuple[int | None, bool]:
    """The declared ``Content-Length`` (None if absent or unreadable) and whether the body is chunked."""
    length, chunked = None, False
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            length = int(value) if value.isdigit() else None
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, exempt: Iterable[str] = ()):
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = frozenset(exempt)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than this gateway's limit of {self.max_bytes} bytes.",
                               code="body_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        declared, chunked = _framing(scope)
        if declared is not None and declared > self.max_bytes:
            # Connection: close, since the body is left unread on the socket.
            await send_error(send, self._too_large(), [(b"connection", b"close")])
            return
        if not chunked:  # a declared length within the limit, or no body at all
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending: nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await send_error(send, self._too_large(), [(b"connection", b"close")])
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()

        await self.app(scope, replay, send)
