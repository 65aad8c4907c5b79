"""Small async helpers for serving generations: merging choice streams, watching for disconnects, SSE."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Awaitable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError

log = logging.getLogger(__name__)

T = TypeVar("T")
_END = object()

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def error_frames(exc: BaseException) -> bytes:
    """How a started event stream reports a failure: one ``data: {"error": ...}`` frame, then ``[DONE]``."""
    if isinstance(exc, GatewayError):
        return sse(exc.envelope().model_dump()) + DONE
    return sse({"error": {"message": "generation failed", "type": "server_error", "param": None,
                          "code": None}}) + DONE


async def primed(stream: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """Pull the first item now, so that errors raised before generation starts become plain HTTP errors;
    the returned stream yields it again, then the rest, and closes ``stream`` when closed."""
    first = await anext(stream)

    async def replay() -> AsyncGenerator[T, None]:
        try:
            yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    return replay()


async def merge(streams: list[AsyncGenerator[T, None]]) -> AsyncGenerator[tuple[int, T], None]:
    """Interleave several streams as ``(index, item)``; closing the merged stream closes them all."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[T, None]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
            await queue.put((index, _END))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work``; cancel it and return None if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    finally:
        watcher.cancel()


class EventStreamResponse(Response):
    """An ASGI response streaming bytes as they come; a client disconnect cancels the stream at once.

    Starlette's StreamingResponse needs a task group per response on uvicorn (ASGI spec 2.3); this costs one
    watcher task, and cancels the producer even while it waits for the next upstream chunk. A producer that fails
    after the first byte (a worker dying mid-stream) ends an event stream with ``error_frames``, never with a
    dropped connection.
    """

    def __init__(self, chunks: AsyncGenerator[bytes, None], headers: dict[str, str] | None = None,
                 media_type: str = "text/event-stream"):
        self.chunks = chunks
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"} | (headers or {}))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.current_task()
        disconnected = False

        async def watch() -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            if streaming is not None:
                streaming.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            try:
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except Exception as exc:
                if not self.media_type.startswith("text/event-stream"):
                    raise
                if not isinstance(exc, GatewayError):
                    log.exception("event stream failed after its first byte")
                await send({"type": "http.response.body", "body": error_frames(exc), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not disconnected:
                raise
        finally:
            watcher.cancel()
            await self.chunks.aclose()
