"""Fault fixtures: tiny real HTTP servers on loopback that speak the worker protocol and misbehave on purpose.

They are not inference workers (they generate nothing; the text is scripted) and stand in for a vLLM worker
only where a real one cannot be made to fail on cue. Each ``ScriptedWorker`` answers ``GET /health`` and
``GET /v1/models`` like a worker, and ``POST /v1/chat/completions`` / ``/v1/completions`` according to ``mode``:

- ``ok``: streams one SSE chunk per requested token (``max_tokens``, else ``chunks``) ``delay_s`` apart, or one
  JSON answer after the same time;
- ``reset``: reads the request, then resets the connection (RST) before any answer;
- ``hang``: reads the request and never answers;
- ``hang_after_headers``: sends the 200 head of an event stream, then nothing;
- ``empty``: sends a 200 head and ends the body at once (a worker dying between head and first token);
- ``die_mid_stream``: streams two chunks (or half a JSON answer), then closes the connection mid-body.

Every answer is ``connection: close``, so each request is a fresh connection and ``posts`` counts requests.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["ok", "reset", "hang", "hang_after_headers", "empty", "die_mid_stream"]
MODEL = "demo"


def _chat_chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-fixture", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def _text_chunk(text: str, finish: str | None = None) -> dict:
    return {"id": "cmpl-fixture", "object": "text_completion", "created": 0, "model": MODEL,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def _event(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    body = f"data: {data}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(body), body)  # one HTTP/1.1 chunk


def _head(status: str, content_type: str, extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\nconnection: close\r\n{extra}\r\n".encode()


@dataclass
class ScriptedWorker:
    mode: Mode = "ok"
    chunks: int = 3
    delay_s: float = 0.0
    posts: int = 0  # generation requests received
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _closing: asyncio.Event | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ScriptedWorker:
        started = threading.Event()

        async def main() -> None:
            self._closing = asyncio.Event()
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            started.set()
            async with server:
                await self._closing.wait()
            handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in handlers:  # hung answers end with the server
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(main())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="scripted-worker")
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("scripted worker did not start")
        return self

    def stop(self) -> None:
        """Close the port (what follows is "connection refused"); safe to call twice."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._loop.call_soon_threadsafe(self._closing.set)  # type: ignore[union-attr]
        self._thread.join(timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines if ":" in h)}
            body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
            if method == "GET":
                await self._get(path, writer)
            else:
                self.posts += 1
                await self._post(path, json.loads(body or b"{}"), writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()

    async def _get(self, path: str, writer: asyncio.StreamWriter) -> None:
        if path == "/health":
            payload = b""
        elif path == "/v1/models":
            payload = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()
        else:
            writer.write(_head("404 Not Found", "application/json", "content-length: 0\r\n"))
            return
        writer.write(_head("200 OK", "application/json", f"content-length: {len(payload)}\r\n") + payload)
        await writer.drain()

    async def _post(self, path: str, request: dict, writer: asyncio.StreamWriter) -> None:
        chat = path.endswith("/chat/completions")
        stream = bool(request.get("stream"))
        mode = self.mode
        if mode == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if mode == "hang":
            await self._closing.wait()  # type: ignore[union-attr]
            return
        event_head = _head("200 OK", "text/event-stream", "transfer-encoding: chunked\r\n")
        if mode in ("hang_after_headers", "empty"):
            length = 0 if mode == "empty" else 100  # a JSON head promising a body that never comes
            writer.write(event_head if stream else _head("200 OK", "application/json", f"content-length: {length}\r\n"))
            await writer.drain()
            if mode == "hang_after_headers":
                await self._closing.wait()  # type: ignore[union-attr]
            return
        words = [f"word{i} " for i in range(int(request.get("max_tokens") or self.chunks))]
        if not stream:
            await asyncio.sleep(self.delay_s * len(words))
            text = "".join(words)
            answer = ({"id": "chatcmpl-fixture", "object": "chat.completion", "created": 0, "model": MODEL,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "length"}]} if chat else _text_chunk(text, "length"))
            payload = json.dumps(answer).encode()
            head = _head("200 OK", "application/json", f"content-length: {len(payload)}\r\n")
            if mode == "die_mid_stream":  # half the answer, then the connection drops
                writer.write(head + payload[:len(payload) // 2])
                await writer.drain()
                writer.close()
                return
            writer.write(head + payload)
            await writer.drain()
            return
        writer.write(event_head)
        if chat:
            writer.write(_event(_chat_chunk({"role": "assistant", "content": ""})))
        for i, word in enumerate(words):
            if mode == "die_mid_stream" and i == 1:
                await writer.drain()
                writer.close()  # the worker process is gone: no final chunk, no [DONE]
                return
            await asyncio.sleep(self.delay_s)
            last = "length" if i == len(words) - 1 else None
            writer.write(_event(_chat_chunk({"content": word}, last) if chat else _text_chunk(word, last)))
            await writer.drain()
        writer.write(_event("[DONE]") + b"0\r\n\r\n")
        await writer.drain()


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
