"""``GET /metrics``: Prometheus text format, read live from the worker's state at scrape time.

Each app gets its own ``CollectorRegistry`` (no process-global default registry), so several apps in one process
(tests) never share or clash over metrics. With ``--workers N`` every uvicorn worker is its own process with its
own registry, and a scrape reaches whichever worker accepts the connection: the gauges are *per process*. That is
what the target version needs — "does this worker serve version N?" — and Prometheus' ``max``/``min`` over
scrapes shows stragglers; a fleet-wide sum of counters would need prometheus_client's multiprocess mode, which
this gateway does not use.
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


@router.get("/metrics", summary="Prometheus metrics of this worker process", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
