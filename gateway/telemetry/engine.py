"""An engine wrapper that measures what the request waits on the engine for, and counts engine failures.

Why a wrapper instead of hooks in the handler: the handler (and the policies wired into it later) stay free of
timing code, and both engines are measured the same way. Every await on the engine — ``relay`` up to the
response head, each ``anext`` of a generation or a relayed body — is bracketed with
``RequestTelemetry.upstream_enter/exit``; the rest of the request's time is the gateway's overhead.

Anything else is delegated to the wrapped engine (``inner``), so code that needs engine-specific attributes
(``engine.main`` of the local engine, ``engine.workers`` of the vLLM engine) keeps working; ``relay`` exists only
when the wrapped engine has it, because the handler uses its presence to choose the byte-relay path.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from time import perf_counter
from typing import Any, TypeVar

from gateway.engines.base import Engine, GenerationDelta, GenerationRequest
from gateway.errors import GatewayError, Unavailable, UpstreamError, UpstreamTimeout
from gateway.telemetry.context import RequestTelemetry, current_request
from gateway.telemetry.instruments import GatewayMetrics

T = TypeVar("T")

# The vLLM engine reports a broken worker stream as one SSE error frame (json.dumps of the error envelope).
_ERROR_FRAME = b'data: {"error"'


def _kind(exc: BaseException, started: bool) -> str | None:
    """The upstream-error kind of an engine exception, or None when it is the client's fault or a cancel."""
    if isinstance(exc, Unavailable):
        return "unavailable"
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamError):
        return "stream" if started else "status"
    if isinstance(exc, (GatewayError, asyncio.CancelledError, GeneratorExit)):
        return None  # 4xx relayed from the worker (bad request, unknown model): not an engine failure
    return "other"


class InstrumentedEngine:
    def __init__(self, inner: Engine, metrics: GatewayMetrics):
        self.inner = inner
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def model_names(self) -> list[str]:
        return self.inner.model_names()

    async def start(self) -> None:
        await self.inner.start()

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        return self._timed(self.inner.generate(request), current_request())

    def _failed(self, exc: BaseException, started: bool, telemetry: RequestTelemetry | None) -> None:
        kind = _kind(exc, started)
        if kind is not None:
            self._metrics.upstream_errors.labels(kind).inc()
            if telemetry is not None:
                telemetry.upstream_error = kind

    async def _timed(self, stream: AsyncIterator[T], telemetry: RequestTelemetry | None,
                     frames: bool = False) -> AsyncIterator[T]:
        """Yield ``stream``'s items, timing each wait; ``frames``: also spot error frames in relayed bytes.

        Once per chunk of every stream, so the loop binds what it calls to locals."""
        started = False
        enter = telemetry.upstream_enter if telemetry is not None else _nothing
        leave = telemetry.upstream_exit if telemetry is not None else _nothing
        next_item = stream.__anext__
        try:
            while True:
                enter()
                try:
                    item = await next_item()
                except StopAsyncIteration:
                    return
                except BaseException as exc:
                    self._failed(exc, started, telemetry)
                    raise
                finally:
                    leave()
                started = True
                if frames and item.startswith(_ERROR_FRAME):  # type: ignore[attr-defined]
                    self._failed(UpstreamError("error frame"), True, telemetry)
                yield item
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()


def _nothing() -> None:
    return None


class InstrumentedRelayEngine(InstrumentedEngine):
    """For engines that relay bytes (the vLLM engine): times the request up to the worker's response head too."""

    async def relay(self, path: str, payload: bytes, *, stream: bool = False) -> Any:
        telemetry = current_request()
        if telemetry is not None:
            telemetry.upstream_enter()
        try:
            relayed = await self.inner.relay(path, payload, stream=stream)  # type: ignore[attr-defined]
        except BaseException as exc:
            self._failed(exc, False, telemetry)
            raise
        finally:
            if telemetry is not None:
                telemetry.upstream_exit()
        relayed.body = self._relayed(relayed.body, telemetry)
        return relayed

    async def _relayed(self, body: AsyncIterator[bytes], telemetry: RequestTelemetry | None) -> AsyncIterator[bytes]:
        """The relayed body, each wait timed. A relay is the request's only engine call, so waits add up without
        the interval bookkeeping of ``_timed``; this runs once per chunk of every relayed stream."""
        if telemetry is None:
            async for chunk in self._timed(body, None, frames=True):
                yield chunk
            return
        clock = perf_counter
        next_chunk = body.__anext__
        try:
            while True:
                waited = clock()
                try:
                    chunk = await next_chunk()
                except StopAsyncIteration:
                    return
                except BaseException as exc:
                    self._failed(exc, True, telemetry)
                    raise
                finally:
                    telemetry.upstream_seconds += clock() - waited
                    telemetry.upstream_waits += 1
                if chunk.startswith(_ERROR_FRAME):
                    self._failed(UpstreamError("error frame"), True, telemetry)
                yield chunk
        finally:
            await body.aclose()  # type: ignore[attr-defined]


def instrument(engine: Engine, metrics: GatewayMetrics) -> InstrumentedEngine:
    cls = InstrumentedRelayEngine if hasattr(engine, "relay") else InstrumentedEngine
    return cls(engine, metrics)
