"""Raw-ASGI helpers shared by the benchmark fixtures (synthetic upstream, relay proxies).

The fixtures avoid FastAPI on purpose: whatever sits in front of them should be the only framework cost
a benchmark sees, so they speak bare ASGI and are served by uvicorn with uvloop and httptools.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]

JSON = b"application/json"
EVENT_STREAM = b"text/event-stream"


async def read_body(receive: Receive) -> bytes:
    """The whole request body; uvicorn may deliver it in several messages."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(parts)


async def start_response(send: Send, status: int, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"cache-control", b"no-cache")]})


async def respond(send: Send, status: int, body: bytes = b"", content_type: bytes = JSON) -> None:
    """A complete, non-streamed response."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def serve_lifespan(receive: Receive, send: Send, startup: Hook | None = None,
                         shutdown: Hook | None = None) -> None:
    """Answer uvicorn's lifespan protocol, running optional hooks (fixtures open their HTTP clients there)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if startup is not None:
                await startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if shutdown is not None:
                await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


def run_fixture(app: ASGIApp, port: int, host: str = "127.0.0.1") -> None:
    """Serve a fixture in this process: one uvicorn worker, uvloop + httptools, no access log."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, loop="uvloop", http="httptools", lifespan="on", log_level="warning",
                access_log=False)
