"""Requests still running when a graceful shutdown runs out of time end with an answer, not a dropped socket.

On SIGTERM uvicorn stops accepting connections and lets in-flight requests finish for ``shutdown_grace_s``
(``timeout_graceful_shutdown``); then it cancels their tasks. Left alone, a cancelled stream would stop mid-chunk
and a request still waiting on the engine or the classifier would get uvicorn's plain-text 500. This pure ASGI
middleware turns that cancellation into an ending a client can handle:

- nothing sent yet: a 503 ``shutting_down`` error envelope with ``retry-after`` (another replica can serve it);
- an event stream under way: a final ``data: {"error": ...}`` frame and ``data: [DONE]``, then the end of body.

A client disconnect never gets here: ``EventStreamResponse`` and ``unless_disconnected`` end those requests
themselves, so a cancellation reaching this middleware comes from the server.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import Unavailable
from gateway.openai._streams import error_frames

_EVENT_STREAM = b"text/event-stream"


def _shutting_down() -> Unavailable:
    return Unavailable("the gateway is shutting down; retry the request", code="shutting_down")


class ShutdownMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = event_stream = False

        async def tracking_send(message: Message) -> None:
            nonlocal started, finished, event_stream
            if message["type"] == "http.response.start":
                started = True
                event_stream = any(name == b"content-type" and value.startswith(_EVENT_STREAM)
                                   for name, value in message.get("headers", ()))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if finished:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # handled: the request ends with the answer below
            if not started:
                body = _shutting_down().envelope().model_dump_json().encode()
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()), (b"retry-after", b"1")]})
                await send({"type": "http.response.body", "body": body})
                return
            if event_stream:
                await send({"type": "http.response.body", "body": error_frames(_shutting_down()), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
