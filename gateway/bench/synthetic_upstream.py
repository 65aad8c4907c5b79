"""Synthetic fast upstream: a BENCHMARK FIXTURE, and never evidence of anything else.

It speaks just enough of vLLM's OpenAI wire protocol (``/health``, ``/v1/models``, ``/v1/chat/completions``)
for the gateway's vLLM engine to use it, and answers every chat request with the same canned text: ``chunks``
``chat.completion.chunk`` events paced ``interval_s`` apart, then ``data: [DONE]``. No model runs, nothing
is generated. It exists so that ``unlearn-gateway bench`` can measure what sits *in front of* an upstream
(the gateway, an HTTP client library) with the upstream's own cost held small and constant. Its figures say
nothing about any model, worker or vLLM deployment, and must not be quoted as if they did.

Run: ``python -m gateway.bench.synthetic_upstream --port 8200 [--chunks 32] [--interval-ms 10]``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from typing import Any

from gateway.bench._asgi import (
    EVENT_STREAM,
    ASGIApp,
    Receive,
    Scope,
    Send,
    read_body,
    respond,
    run_fixture,
    serve_lifespan,
    start_response,
)

MODEL_ID = "synthetic"
DEFAULT_CHUNKS = 32
DEFAULT_INTERVAL_S = 0.010
_ID = b"@ID@"  # placeholder in the pre-encoded events, replaced by each request's id
_DONE = b"data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _chunk(created: int, delta: dict[str, str], finish_reason: str | None) -> bytes:
    return _event({"id": _ID.decode(), "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})


def _words(chunks: int) -> list[str]:
    return [f" w{i}" for i in range(chunks)]


def _usage(chunks: int) -> dict[str, int]:
    return {"prompt_tokens": 8, "completion_tokens": chunks, "total_tokens": 8 + chunks}


def _stream_events(chunks: int, created: int) -> tuple[bytes, list[bytes], bytes]:
    """Pre-encoded role chunk, content chunks (the last one finishes) and usage chunk, as vLLM sends them.

    Encoding once at start-up keeps the fixture's per-request CPU cost near zero, so it stays fast
    even when the benchmark shares the machine with what it measures.
    """
    role = _chunk(created, {"role": "assistant", "content": ""}, None)
    words = _words(chunks)
    content = [_chunk(created, {"content": w}, "length" if i == chunks - 1 else None) for i, w in enumerate(words)]
    usage = _event({"id": _ID.decode(), "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
                    "choices": [], "usage": _usage(chunks)})
    return role, content, usage


def create_app(chunks: int = DEFAULT_CHUNKS, interval_s: float = DEFAULT_INTERVAL_S) -> ASGIApp:
    """The fixture as a raw ASGI app; all its state lives in this closure."""
    created = int(time.time())
    role_event, content_events, usage_event = _stream_events(chunks, created)
    request_ids = itertools.count()
    models_body = json.dumps({"object": "list", "data": [
        {"id": MODEL_ID, "object": "model", "created": created, "owned_by": "bench-fixture", "root": MODEL_ID,
         "parent": None, "max_model_len": 4096}]}).encode()
    not_found = json.dumps({"error": {"message": "not found", "type": "NotFoundError", "param": None,
                                      "code": 404}}).encode()

    async def stream(send: Send, request_id: bytes, include_usage: bool) -> None:
        # Events follow an absolute schedule, so the pace does not drift when a send is late.
        loop = asyncio.get_running_loop()
        start = loop.time()
        await start_response(send, 200, EVENT_STREAM)
        await send({"type": "http.response.body", "body": role_event.replace(_ID, request_id), "more_body": True})
        for i, event in enumerate(content_events, start=1):
            await asyncio.sleep(max(0.0, start + i * interval_s - loop.time()))
            await send({"type": "http.response.body", "body": event.replace(_ID, request_id), "more_body": True})
        tail = (usage_event.replace(_ID, request_id) if include_usage else b"") + _DONE
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    async def complete(send: Send, request_id: bytes) -> None:
        await asyncio.sleep(chunks * interval_s)
        body = {"id": request_id.decode(), "object": "chat.completion", "created": created, "model": MODEL_ID,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(_words(chunks))},
                             "logprobs": None, "finish_reason": "length"}],
                "usage": _usage(chunks)}
        await respond(send, 200, json.dumps(body).encode())

    async def chat(receive: Receive, send: Send) -> None:
        try:
            request = json.loads(await read_body(receive) or b"{}")
        except ValueError:
            await respond(send, 400, b'{"error":{"message":"invalid JSON","type":"BadRequestError","code":400}}')
            return
        request_id = f"chatcmpl-synthetic-{next(request_ids)}".encode()
        if request.get("stream"):
            include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
            await stream(send, request_id, include_usage)
        else:
            await complete(send, request_id)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        route = (scope["method"], scope["path"])
        if route == ("POST", "/v1/chat/completions"):
            await chat(receive, send)
        elif route == ("GET", "/health"):
            await respond(send, 200)
        elif route == ("GET", "/v1/models"):
            await respond(send, 200, models_body)
        else:
            await respond(send, 404, not_found)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help="content chunks per streamed answer")
    parser.add_argument("--interval-ms", type=float, default=DEFAULT_INTERVAL_S * 1000, help="pace of the chunks")
    args = parser.parse_args()
    run_fixture(create_app(args.chunks, args.interval_ms / 1000), args.port, args.host)


if __name__ == "__main__":
    main()
