"""``GET /metrics``: Prometheus text format for one gateway process, or for all workers of one server.

Each app gets its own ``CollectorRegistry`` (no process-global default registry), so several apps in one process
(tests) never share or clash over metrics. Two kinds of metrics live there:

- the hot-reload state (``TargetsCollector``), read live from the worker at scrape time. It is *per process*
  (label ``pid``): "does this worker serve version N?"; Prometheus' ``max``/``min`` over scrapes shows stragglers;
- the request instruments (``gateway.telemetry.instruments``): counters and histograms.

With ``serve --workers N`` (N > 1) a scrape reaches whichever worker accepts the connection, so per-process
counters would jump between workers' values. ``serve`` therefore turns on prometheus_client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``): every worker writes its counters and histograms to files in that folder and a
scrape sums them over all workers of the server. One-process servers (containers with one worker, the tests)
keep plain in-memory instruments. Either way a Prometheus target is one server (container or pod).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.responses import Response

from gateway.registry.reload import TargetReloader
from gateway.telemetry.instruments import GatewayMetrics
from gateway.telemetry.multiprocess import MULTIPROC_ENV

router = APIRouter(tags=["health"])


class TargetsCollector(Collector):
    """The hot-reload state of one worker, read at scrape time (nothing to keep in sync)."""

    def __init__(self, reloader: TargetReloader):
        self.reloader = reloader

    def collect(self) -> Iterator[Metric]:
        active, stats = self.reloader.current, self.reloader.stats
        labels = {"pid": str(os.getpid())}

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=list(labels))
            family.add_metric(list(labels.values()), value)
            return family

        yield gauge("unlearn_targets_version", "Target set version this worker process serves (per process)",
                    active.version)
        yield gauge("unlearn_targets_active", "Targets in the set this worker process serves", len(active.targets))
        yield gauge("unlearn_targets_loaded_timestamp_seconds", "Unix time the active set was swapped in",
                    active.loaded_at)
        yield gauge("unlearn_target_store_up", "1 while the target store is reachable (within the grace period)",
                    1.0 if self.reloader.store_ok() else 0.0)
        yield gauge("unlearn_targets_last_load_seconds", "Duration of the last snapshot read + index build",
                    stats.last_load_seconds)
        loads = CounterMetricFamily("unlearn_targets_loads", "Target sets swapped in by this worker process",
                                    labels=list(labels))
        loads.add_metric(list(labels.values()), stats.loads)
        yield loads
        failures = CounterMetricFamily("unlearn_targets_load_failures", "Failed target loads (old set kept)",
                                       labels=list(labels))
        failures.add_metric(list(labels.values()), stats.load_failures)
        yield failures


def build_registry(reloader: TargetReloader) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TargetsCollector(reloader))
    return registry


def multiprocess_dir() -> str | None:
    """The shared metrics folder when this process is one worker of a multi-worker server, else None."""
    return os.environ.get(MULTIPROC_ENV) or None


def build_metrics(reloader: TargetReloader, max_target_labels: int = 1000) -> tuple[CollectorRegistry, GatewayMetrics]:
    """The registry ``/metrics`` serves and the request instruments that feed it (see the module docstring)."""
    registry = build_registry(reloader)
    shared = multiprocess_dir()
    if shared is None:
        return registry, GatewayMetrics(registry, max_target_labels)
    from prometheus_client.multiprocess import MultiProcessCollector

    MultiProcessCollector(registry, path=shared)
    return registry, GatewayMetrics(None, max_target_labels)  # values go to the shared files, read at scrape


@router.get("/metrics", summary="Prometheus metrics of this worker process", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
