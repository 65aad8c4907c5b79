"""Observability: /metrics after real traffic, the decision API, aborts, upstream errors, reload lag, request ids,
the overhead header, multi-worker counters, tracing.

Flagging is not wired into the request path yet, so flagged traffic is produced the way the handler will produce
it: by calling ``RequestTelemetry.record_decision`` from inside a request (from a route, and from an engine that
the real handler calls), which exercises the same plumbing end to end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import Request
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.bench import _load
from gateway.engines.base import GenerationDelta, GenerationRequest
from gateway.settings import Settings
from gateway.telemetry import current_request
from tests.conftest import Server, serve, unique_prefix
from tests.test_admin_api import ADMIN, ADMIN_KEY

CHAT = "/v1/chat/completions"
BODY = {"model": "demo", "messages": [{"role": "user", "content": "Where is Chukwu Akabueze from?"}],
        "max_tokens": 4, "temperature": 0}


def samples(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page, keyed by (sample name, labels)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(page: dict, name: str, **labels: str) -> float:
    """The sum over samples of ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in page.items() if n == name and wanted <= ls)


def wait_until(check, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_unflagged_traffic_is_counted_with_timings_and_headers(gateway: Server):
    before = samples(gateway.url)
    plain = httpx.post(gateway.url + CHAT, json=BODY, timeout=60)
    assert plain.status_code == 200
    with httpx.stream("POST", gateway.url + CHAT, json=BODY | {"stream": True}, timeout=60) as streamed:
        assert streamed.status_code == 200
        streamed.read()
    missing = httpx.post(gateway.url + CHAT, json={"messages": "not a list"}, timeout=60)
    assert missing.status_code == 400
    after = samples(gateway.url)

    route = {"route": CHAT}
    # Served requests were classified (no targets: unflagged); the invalid one never reached the classifier.
    ok = route | {"method": "POST", "status": "200", "decision": "unflagged", "policy": "none"}
    assert value(after, "unlearn_requests_total", **ok) - value(before, "unlearn_requests_total", **ok) == 2
    bad = ok | {"status": "400", "decision": "none"}
    assert value(after, "unlearn_requests_total", **bad) - value(before, "unlearn_requests_total", **bad) == 1
    for histogram, new in (("unlearn_request_duration_seconds_count", 3), ("unlearn_gateway_overhead_seconds_count", 2),
                           ("unlearn_time_to_first_token_seconds_count", 1)):
        assert value(after, histogram, **route) - value(before, histogram, **route) == new, histogram
    # the gateway's own time is a small part of a request that generated tokens
    overhead = value(after, "unlearn_gateway_overhead_seconds_sum", **route) - value(
        before, "unlearn_gateway_overhead_seconds_sum", **route)
    total = value(after, "unlearn_request_duration_seconds_sum", **route) - value(
        before, "unlearn_request_duration_seconds_sum", **route)
    assert 0 < overhead < total

    for response in (plain, streamed):
        assert len(response.headers["x-request-id"]) == 32
        assert 0 <= float(response.headers["x-unlearn-overhead-ms"]) < 1000
    assert "x-unlearn-overhead-ms" not in missing.headers  # rejected before any engine work: not measurable
    assert value(after, "unlearn_targets_version") >= 0  # the existing per-process gauges are still there


def test_request_ids_are_honoured_or_replaced(local_gateway: Server):
    given = httpx.get(local_gateway.url + "/v1/models", headers={"x-request-id": "client-id.42:a_b"})
    assert given.headers["x-request-id"] == "client-id.42:a_b"
    hostile = httpx.get(local_gateway.url + "/v1/models", headers={"x-request-id": 'x" injected=1'})
    assert hostile.headers["x-request-id"] != 'x" injected=1' and len(hostile.headers["x-request-id"]) == 32
    denied = httpx.get(local_gateway.url + "/admin/targets")  # rejected by auth: still has an id
    assert denied.status_code == 401 and denied.headers["x-request-id"]


class DecidingEngine:
    """The demo engine, plus what the classifier step will do: record a decision from inside the request."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        telemetry = current_request()
        assert telemetry is not None, "the request's telemetry must be visible inside the engine call"
        flagged = "Akabueze" in str(request.messages)
        telemetry.record_decision(flagged, ["chukwu-akabueze", "other-target"] if flagged else [],
                                  "guard" if flagged else None, classifier_seconds=0.004)
        async for delta in self.inner.generate(request):
            yield delta


@pytest.fixture(scope="module")
def deciding_gateway(demo_engine) -> Iterator[Server]:
    app = create_app(Settings(metrics_max_target_labels=2), engine=DecidingEngine(demo_engine))

    @app.post("/probe")
    async def probe(request: Request) -> dict:  # the request.state face of the same API
        request.state.telemetry.record_decision(True, ["via-state"], "refuse", classifier_seconds=0.001)
        return {"request_id": request.state.telemetry.request_id}

    server = serve(app)
    yield server
    server.stop()


def test_flagged_and_unflagged_traffic_through_the_decision_api(deciding_gateway: Server):
    url = deciding_gateway.url
    flagged = httpx.post(url + CHAT, json=BODY, timeout=60)
    unflagged = httpx.post(url + CHAT, json=BODY | {"messages": [{"role": "user", "content": "Hello there"}]},
                           timeout=60)
    probed = httpx.post(url + "/probe", headers={"x-request-id": "probe-1"})
    assert flagged.status_code == unflagged.status_code == probed.status_code == 200
    assert probed.json() == {"request_id": "probe-1"}
    page = samples(url)
    assert value(page, "unlearn_requests_total", route=CHAT, decision="flagged", policy="guard", status="200") == 1
    assert value(page, "unlearn_requests_total", route=CHAT, decision="unflagged", policy="none") == 1
    assert value(page, "unlearn_requests_total", route="/probe", decision="flagged", policy="refuse") == 1
    assert value(page, "unlearn_flagged_requests_total", target="chukwu-akabueze") == 1
    assert value(page, "unlearn_flagged_requests_total", target="other-target") == 1
    # metrics_max_target_labels=2: a third distinct target id is counted under "other"
    assert value(page, "unlearn_flagged_requests_total", target="other") == 1
    assert value(page, "unlearn_flagged_requests_total", target="via-state") == 0
    assert value(page, "unlearn_classifier_duration_seconds_count") == 3
    assert value(page, "unlearn_classifier_duration_seconds_sum") == pytest.approx(0.009)


def test_client_disconnects_count_as_stream_aborts(local_gateway: Server):
    url = local_gateway.url
    labels = {"route": CHAT}
    before = value(samples(url), "unlearn_stream_aborts_total", **labels)

    async def leave_early() -> None:
        async with httpx.AsyncClient(timeout=60) as client, client.stream(
                "POST", url + CHAT, json=BODY | {"stream": True, "max_tokens": 400}) as response:
            async for _ in response.aiter_bytes():
                break  # first chunk, then hang up

    asyncio.run(leave_early())
    wait_until(lambda: value(samples(url), "unlearn_stream_aborts_total", **labels) == before + 1)


def test_unreachable_workers_count_as_upstream_errors():
    dead = f"http://127.0.0.1:{_load.free_port()}"
    server = serve(create_app(Settings(engine="vllm", worker_urls=[dead], served_model_name="demo",
                                       upstream_retries=0)))
    try:
        response = httpx.post(server.url + CHAT, json=BODY, timeout=30)
        assert response.status_code == 503
        page = samples(server.url)
        assert value(page, "unlearn_upstream_errors_total", kind="unavailable") == 1
        assert value(page, "unlearn_requests_total", route=CHAT, status="503") == 1
    finally:
        server.stop()


def test_reload_lag_is_observed_after_a_write(demo_engine, redis_url):
    settings = Settings(admin_keys=[ADMIN_KEY], store_url=redis_url, store_prefix=unique_prefix())
    server = serve(create_app(settings, engine=demo_engine), ready_path="/ready")
    try:
        assert value(samples(server.url), "unlearn_targets_reload_lag_seconds_count") == 0  # the first load is no lag
        written = httpx.post(server.url + "/admin/targets", json={"name": "Lag Probe"}, headers=ADMIN).json()
        wait_until(lambda: httpx.get(server.url + "/ready").json()["targets_version"] >= written["version"])
        page = samples(server.url)
        assert value(page, "unlearn_targets_reload_lag_seconds_count") == 1
        assert 0 < value(page, "unlearn_targets_reload_lag_seconds_sum") < 5
    finally:
        server.stop()


def test_tracing_exports_one_span_per_request_joining_the_callers_trace(demo_engine):
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gateway.telemetry.tracing import build_tracer

    exporter = InMemorySpanExporter()
    server = serve(create_app(Settings(), engine=demo_engine, tracer=build_tracer("", "test", exporter=exporter)))
    try:
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        response = httpx.post(server.url + CHAT, json=BODY, timeout=60,
                              headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
        assert response.status_code == 200
        wait_until(lambda: any(s.name == f"POST {CHAT}" for s in exporter.get_finished_spans()))
        span = next(s for s in exporter.get_finished_spans() if s.name == f"POST {CHAT}")
        assert format(span.context.trace_id, "032x") == trace_id
        assert span.attributes["http.response.status_code"] == 200
        assert span.attributes["unlearn.request_id"] == response.headers["x-request-id"]
        assert span.attributes["unlearn.decision"] == "unflagged"
        assert not any("Akabueze" in str(v) for v in span.attributes.values())  # no prompt text in spans
    finally:
        server.stop()


def test_multi_worker_counters_are_summed_over_workers(tmp_path: Path):
    """``serve --workers 2``: every scrape, whichever worker answers, reports the server's total."""
    upstream_port, port = _load.free_port(), _load.free_port()
    upstream = _load.start_server("upstream", _load.module_command(
        "gateway.bench.synthetic_upstream", "--port", str(upstream_port), "--chunks", "2", "--interval-ms", "1"),
        upstream_port, tmp_path, env=_load.clean_env())
    try:
        gateway = _load.start_server("gateway", _load.cli_command("serve", "--port", str(port), "--workers", "2"),
                                     port, tmp_path, ready_path="/ready",
                                     env=_load.clean_env(engine="vllm", worker_urls=upstream.url, log_level="warning",
                                                         store_path=str(tmp_path / "targets.db")))
        try:
            pids, sent = set(), 0
            while len(pids) < 2 or sent < 10:  # new connections until both workers have served some
                assert sent < 300, "the second worker never answered"
                with httpx.Client() as client:
                    pids.add(client.get(gateway.url + "/ready").json()["pid"])
                    assert client.get(gateway.url + "/v1/models").status_code == 200
                sent += 1
            for _ in range(6):  # each scrape may reach either worker
                assert value(samples(gateway.url), "unlearn_requests_total", route="/v1/models", status="200") == sent
        finally:
            gateway.stop()
    finally:
        upstream.stop()
