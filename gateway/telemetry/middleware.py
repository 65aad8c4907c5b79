"""Per-request telemetry as a pure ASGI middleware: request id, metrics, one access-log line, an optional span.

Why pure ASGI (not ``BaseHTTPMiddleware``): it adds no task and no body buffering, so a relayed stream costs a
few attribute checks per chunk. It is the outermost middleware, so rejected requests (401, 503 before the first
target load) are counted and carry a request id too.

Per request it
- takes the caller's ``x-request-id`` when it is a sane token (``[A-Za-z0-9._:-]``, at most 128 characters) or
  makes one (32 hex digits), binds a ``RequestTelemetry`` (``gateway.telemetry.context``) and returns the id as
  ``x-request-id``;
- adds ``x-unlearn-overhead-ms`` to the response head when the request reached an engine: the gateway's own time
  so far (for a stream: everything before the first byte; for JSON: the whole request minus engine time);
- at the end counts ``unlearn_requests_total`` and the histograms, the client's disconnects and flagged targets;
- writes one access-log line: ids, route template (never the raw path, which can name a target), status,
  timings, decision. Prompt and completion text are added only with ``log_content`` (``UNLEARN_LOG_CONTENT``),
  captured up to ``content_limit`` bytes each; flagged target ids likewise, as they say what a user asked about.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.telemetry.context import RequestTelemetry, bind, unbind
from gateway.telemetry.instruments import OTHER, GatewayMetrics
from gateway.telemetry.logs import ACCESS_LOGGER
from gateway.telemetry.tracing import RequestTracer

REQUEST_ID_HEADER = b"x-request-id"
OVERHEAD_HEADER = b"x-unlearn-overhead-ms"
_VALID_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes: logged only when they fail
_EVENT_STREAM = b"text/event-stream"

access_log = logging.getLogger(ACCESS_LOGGER)


@dataclass(frozen=True)
class TelemetryConfig:
    log_content: bool = False
    content_limit: int = 65536


class _Capture:
    """Bounded copy of a body, for ``log_content`` only."""

    __slots__ = ("data", "limit")

    def __init__(self, limit: int):
        self.data = bytearray()
        self.limit = limit

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if room > 0 and chunk:
            self.data += chunk[:room]

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class _RequestIds:
    """New request ids: a random per-app prefix and a counter, 32 hex digits in all. Unique across processes and
    restarts with overwhelming probability, and far cheaper than a uuid4 (an ``os.urandom`` call) per request."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:20]
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFF:012x}"

    def of(self, scope: Scope) -> str:
        for name, value in scope.get("headers", ()):
            if name == REQUEST_ID_HEADER:
                if _VALID_ID.fullmatch(value):
                    return value.decode("ascii")
                break
        return self.new()


class TelemetryMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, config: TelemetryConfig = TelemetryConfig(),
                 tracer: RequestTracer | None = None):
        self.app = app
        self.metrics = metrics
        self.config = config
        self.tracer = tracer
        self._ids = _RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        telemetry = RequestTelemetry(self._ids.of(scope))
        scope.setdefault("state", {})["telemetry"] = telemetry
        span = self.tracer.start(scope, time.time_ns()) if self.tracer is not None else None
        request_body = _Capture(self.config.content_limit) if self.config.log_content else None
        response_body = _Capture(self.config.content_limit) if self.config.log_content else None
        status = 500
        streaming = False
        first_byte: float | None = None
        done = False
        aborted = False
        id_header = (REQUEST_ID_HEADER, telemetry.request_id.encode())

        async def receive_watching() -> Message:
            nonlocal aborted
            message = await receive()
            if message["type"] == "http.disconnect":
                if not done:
                    aborted = True
            elif request_body is not None:
                request_body.add(message.get("body", b""))
            return message

        async def send_measuring(message: Message) -> None:
            nonlocal status, streaming, first_byte, done
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), id_header]
                overhead = telemetry.overhead(perf_counter())
                if overhead is not None:
                    headers.append((OVERHEAD_HEADER, b"%.3f" % (overhead * 1000)))
                for name, value in headers:
                    if name == b"content-type":
                        streaming = value.startswith(_EVENT_STREAM)
                        break
                message["headers"] = headers
            elif kind == "http.response.body":
                body = message.get("body", b"")
                if first_byte is None and body:
                    first_byte = perf_counter()
                if response_body is not None:
                    response_body.add(body)
                if not message.get("more_body", False):
                    done = True
            await send(message)

        token = bind(telemetry)
        failed = False
        try:
            await self.app(scope, receive_watching, send_measuring)
        except BaseException:
            failed = True
            raise
        finally:
            unbind(token)
            self._finish(scope, telemetry, status, streaming, first_byte, aborted or (not done and not failed),
                         failed, request_body, response_body, span)

    def _finish(self, scope: Scope, telemetry: RequestTelemetry, status: int, streaming: bool,
                first_byte: float | None, aborted: bool, failed: bool, request_body: _Capture | None,
                response_body: _Capture | None, span: Any) -> None:
        now = perf_counter()
        route_obj = scope.get("route")
        route = getattr(route_obj, "path", None) or OTHER
        total = now - telemetry.started
        overhead = telemetry.overhead(now)
        ttft = first_byte - telemetry.started if streaming and first_byte is not None else None
        metrics = self.metrics
        metrics.count_request(route, scope["method"], str(status), telemetry.decision, telemetry.policy)
        duration, overhead_histogram, ttft_histogram, aborts = metrics.for_route(route)
        duration.observe(total)
        if overhead is not None:
            overhead_histogram.observe(overhead)
        if ttft is not None:
            ttft_histogram.observe(ttft)
        if telemetry.classifier_seconds is not None:
            metrics.classifier.observe(telemetry.classifier_seconds)
        if telemetry.targets:
            metrics.count_flagged(telemetry.targets)
        if telemetry.fail_closed is not None:
            metrics.fail_closed.labels(telemetry.fail_closed).inc()
        if telemetry.output_guard_hits:
            metrics.count_output_guard_hits(telemetry.output_guard_hits)
        if aborted:
            aborts.inc()

        fields: dict[str, Any] | None = None
        if span is not None or (access_log.isEnabledFor(logging.INFO)
                                and (route not in _QUIET_ROUTES or status >= 400)):
            fields = {
                "request_id": telemetry.request_id, "method": scope["method"], "route": route, "status": status,
                "duration_ms": round(total * 1000, 3),
                "overhead_ms": None if overhead is None else round(overhead * 1000, 3),
                "upstream_ms": round(telemetry.upstream_seconds * 1000, 3) if telemetry.upstream_waits else None,
                "ttft_ms": None if ttft is None else round(ttft * 1000, 3),
                "classifier_ms": None if telemetry.classifier_seconds is None
                else round(telemetry.classifier_seconds * 1000, 3),
                "decision": telemetry.decision, "policy": telemetry.policy, "targets_count": len(telemetry.targets),
                "stream": streaming, "aborted": aborted, "upstream_error": telemetry.upstream_error,
                "fail_closed": telemetry.fail_closed,
                "output_guard_hits": len(telemetry.output_guard_hits),
                "key_id": scope.get("state", {}).get("key_id"),
            }
        if span is not None and fields is not None:
            self.tracer.finish(span, f"{scope['method']} {route}",  # type: ignore[union-attr]
                               {f"unlearn.{k}": v for k, v in fields.items() if k != "route"}
                               | {"http.route": route, "http.response.status_code": status},
                               failed or status >= 500)
        if fields is not None and access_log.isEnabledFor(logging.INFO) and (route not in _QUIET_ROUTES
                                                                             or status >= 400):
            if request_body is not None and response_body is not None:
                fields["targets"] = list(telemetry.targets)
                fields["request_body"] = request_body.text()
                fields["response_body"] = response_body.text()
            access_log.info("request", extra={"event": fields})
