"""Two minimal streaming relay proxies, one over httpx and one over aiohttp: BENCHMARK FIXTURES.

``unlearn-gateway bench http-client`` puts each in front of the same synthetic upstream to compare the two
client libraries as a streaming relay, and nothing else: both are the same raw ASGI app (no FastAPI), forward
the request body untouched and pass the answer back byte for byte as it arrives. They are not the gateway,
and their figures say nothing about it beyond which client library to build it on.

Run: ``python -m gateway.bench.relays --client aiohttp --upstream http://127.0.0.1:8200 --port 8300``
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Literal, Protocol

import aiohttp

from gateway.bench._asgi import ASGIApp, Receive, Scope, Send, read_body, respond, run_fixture, serve_lifespan

if TYPE_CHECKING:
    import httpx

ClientKind = Literal["httpx", "aiohttp"]
CLIENT_KINDS: tuple[ClientKind, ...] = ("httpx", "aiohttp")
_CONNECT_TIMEOUT_S = 5.0
_READ_TIMEOUT_S = 600.0


class RelayClient(Protocol):
    """What a relay needs from an HTTP client library: open, forward one request, close."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def relay(self, path: str, body: bytes, content_type: bytes, send: Send) -> None: ...


async def _bad_gateway(send: Send, exc: Exception) -> None:
    message = json.dumps({"error": {"message": f"upstream unreachable: {exc}", "type": "server_error"}})
    await respond(send, 502, message.encode())


class HttpxRelay:
    """``httpx.AsyncClient`` with an unbounded keep-alive pool, streaming with ``aiter_raw`` (no decoding)."""

    def __init__(self, upstream: str):
        self._upstream = upstream.rstrip("/")
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        import httpx  # a test extra, not a core dependency: imported only where this relay runs

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=60)
        timeout = httpx.Timeout(connect=_CONNECT_TIMEOUT_S, read=_READ_TIMEOUT_S, write=_READ_TIMEOUT_S, pool=None)
        self._client = httpx.AsyncClient(limits=limits, timeout=timeout)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def relay(self, path: str, body: bytes, content_type: bytes, send: Send) -> None:
        import httpx

        assert self._client is not None, "start() was not awaited"
        request = self._client.build_request("POST", self._upstream + path, content=body,
                                             headers={"content-type": content_type.decode()})
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            await _bad_gateway(send, exc)
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(b"content-type", response.headers.get("content-type", "").encode())]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


class AiohttpRelay:
    """``aiohttp.ClientSession`` with an unbounded keep-alive pool, streaming with ``iter_any``."""

    def __init__(self, upstream: str):
        self._upstream = upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=None, connect=_CONNECT_TIMEOUT_S, sock_read=_READ_TIMEOUT_S)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def relay(self, path: str, body: bytes, content_type: bytes, send: Send) -> None:
        assert self._session is not None, "start() was not awaited"
        try:
            response = await self._session.post(self._upstream + path, data=body,
                                                 headers={"content-type": content_type.decode()})
        except aiohttp.ClientConnectorError as exc:
            await _bad_gateway(send, exc)
            return
        try:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(b"content-type", response.headers.get("content-type", "").encode())]})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            response.close()


def make_client(kind: ClientKind, upstream: str) -> RelayClient:
    return HttpxRelay(upstream) if kind == "httpx" else AiohttpRelay(upstream)


def create_app(client: RelayClient) -> ASGIApp:
    """A relay proxy: ``GET /health`` answers itself, every POST is forwarded to the upstream."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send, client.start, client.aclose)
            return
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"] == "/health":
            await respond(send, 200)
        elif scope["method"] == "POST":
            content_type = dict(scope["headers"]).get(b"content-type", b"application/json")
            await client.relay(scope["path"], await read_body(receive), content_type, send)
        else:
            await respond(send, 404, b'{"error":{"message":"not found","type":"not_found_error"}}')

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--client", choices=CLIENT_KINDS, required=True)
    parser.add_argument("--upstream", required=True, help="base URL of the upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    run_fixture(create_app(make_client(args.client, args.upstream)), args.port, args.host)


if __name__ == "__main__":
    main()
