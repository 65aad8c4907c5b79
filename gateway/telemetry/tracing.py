"""OpenTelemetry tracing, off by default: one server span per request, exported over OTLP/HTTP.

Why optional and lazy: most deployments read metrics and logs only, and the OpenTelemetry SDK costs import time
and a background export thread. Nothing here imports ``opentelemetry`` until ``UNLEARN_OTEL_ENDPOINT`` is set, and
the packages come with the ``otel`` extra (``pip install 'unlearn-gateway[otel]'``; the gateway image has them).

Each app gets its own ``TracerProvider`` (never the process-global one), so tests and several apps in a process do
not share exporters. An incoming W3C ``traceparent`` header is honoured, so the gateway's span joins the caller's
trace. Span attributes carry ids, route, status, decision and timings; never prompt or completion text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.types import Scope


class RequestTracer:
    """Starts and ends one span per request on its own provider."""

    def __init__(self, provider: Any):
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self._tracer = provider.get_tracer("unlearn-gateway")
        self._propagator = TraceContextTextMapPropagator()
        self._server = trace.SpanKind.SERVER
        self._error = trace.Status(trace.StatusCode.ERROR)

    def start(self, scope: Scope, start_ns: int) -> Any:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())
                   if k in (b"traceparent", b"tracestate")}
        parent = self._propagator.extract(headers) if headers else None
        return self._tracer.start_span(f"{scope['method']} {scope['path']}", context=parent, kind=self._server,
                                       start_time=start_ns)

    def finish(self, span: Any, name: str, attributes: Mapping[str, Any], failed: bool) -> None:
        span.update_name(name)
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        if failed:
            span.set_status(self._error)
        span.end()

    def shutdown(self) -> None:
        self._provider.shutdown()


def build_tracer(endpoint: str, service_name: str, exporter: Any | None = None) -> RequestTracer:
    """A tracer exporting to ``endpoint`` (an OTLP/HTTP traces URL such as ``http://collector:4318/v1/traces``),
    or to ``exporter`` when given (tests pass an in-memory exporter)."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("UNLEARN_OTEL_ENDPOINT is set but OpenTelemetry is not installed: "
                           "pip install 'unlearn-gateway[otel]'") from exc
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return RequestTracer(provider)
