"""The gateway's Prometheus instruments, created per app on the app's own registry.

Why per app and not module-level: several apps live in one process in the tests and benchmarks, and each must
count only its own traffic. Label values are bounded so a scrape stays small whatever the traffic: ``route`` is a
route template (``/admin/targets/{target_id}``) or ``other``; ``decision`` and ``policy`` come from a short fixed
vocabulary; ``target`` is a target id, but only the first ``max_target_labels`` distinct ids per process get their
own series (later ones are counted under ``other``), since a deployment may hold 100,000 targets.

Buckets: request latency spans a cached refusal (ms) to a long generation (minutes); overhead and classifier
time are the gateway's own milliseconds; reload lag spans a pub/sub hop (ms) to a large import (seconds).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OVERHEAD_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
CLASSIFIER_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RELOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

OTHER = "other"


class GatewayMetrics:
    """Every request-path instrument. ``registry=None`` creates them unregistered (multiprocess mode, where
    the scrape reads the values from the shared files instead)."""

    def __init__(self, registry: CollectorRegistry | None, max_target_labels: int = 1000):
        self.requests = Counter("unlearn_requests", "HTTP requests by route template, status, classifier decision "
                                "and applied policy", ["route", "method", "status", "decision", "policy"],
                                registry=registry)
        self.flagged = Counter("unlearn_flagged_requests", "Requests flagged by the classifier, per matched target "
                               "(a request matching two targets counts for both)", ["target"], registry=registry)
        self.duration = Histogram("unlearn_request_duration_seconds", "Total request time, first byte in to last "
                                  "byte out", ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.overhead = Histogram("unlearn_gateway_overhead_seconds", "Request time not spent waiting on the "
                                  "engine (total minus upstream), for requests that reached an engine", ["route"],
                                  buckets=OVERHEAD_BUCKETS, registry=registry)
        self.classifier = Histogram("unlearn_classifier_duration_seconds", "Time spent classifying a request",
                                    buckets=CLASSIFIER_BUCKETS, registry=registry)
        self.ttft = Histogram("unlearn_time_to_first_token_seconds", "Streamed responses: request start to the "
                              "first body byte sent (the first token, or the role chunk that comes with it)",
                              ["route"], buckets=TTFT_BUCKETS, registry=registry)
        self.aborts = Counter("unlearn_stream_aborts", "Requests whose client disconnected before the response "
                              "was complete", ["route"], registry=registry)
        self.upstream_errors = Counter("unlearn_upstream_errors", "Engine failures seen by requests: unavailable "
                                       "(no worker reachable), timeout (no first token in time), status (worker "
                                       "error answer), stream (broke mid-stream), other", ["kind"],
                                       registry=registry)
        # Errors, never interventions: a request the classifier flagged is unlearn_requests_total{decision=flagged}.
        self.fail_closed = Counter("unlearn_fail_closed", "Requests failed closed because classification could "
                                   "not run (answered 503, or the refusal with fail_mode=refuse; never "
                                   "unguarded), by reason: classifier_error, classifier_timeout, "
                                   "classifier_index_missing, targets_not_loaded", ["reason"], registry=registry)
        self.output_guard_hits = Counter("unlearn_output_guard_hits", "Answers the output guard stopped because "
                                         "they reproduced a target's facts (classifier misses caught late), per "
                                         "target and action (error, refuse)", ["target", "action"],
                                         registry=registry)
        self.reload_lag = Histogram("unlearn_targets_reload_lag_seconds", "From this worker learning of a newer "
                                    "target set version (notification or resync) to serving it",
                                    buckets=RELOAD_BUCKETS, registry=registry)
        self._max_targets = max_target_labels
        self._targets: set[str] = set()
        self._targets_lock = threading.Lock()
        self._by_route: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._request_children: dict[tuple[str, str, str, str, str], Any] = {}

    # Label children cached by value: prometheus_client's ``labels()`` validates and locks on every call, which
    # is most of an instrument's cost per request. Label values are bounded (see the module docstring).
    def for_route(self, route: str) -> tuple[Any, Any, Any, Any]:
        """(duration, overhead, time to first token, aborts) children for one route template."""
        children = self._by_route.get(route)
        if children is None:
            children = (self.duration.labels(route), self.overhead.labels(route), self.ttft.labels(route),
                        self.aborts.labels(route))
            self._by_route[route] = children
        return children

    def count_request(self, route: str, method: str, status: str, decision: str, policy: str) -> None:
        key = (route, method, status, decision, policy)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(*key)
        child.inc()

    def count_flagged(self, targets: Iterable[str]) -> None:
        for target in targets:
            self.flagged.labels(self._target_label(target)).inc()

    def count_output_guard_hits(self, hits: Iterable[tuple[str, str]]) -> None:
        for target, action in hits:
            self.output_guard_hits.labels(self._target_label(target), action).inc()

    def _target_label(self, target: str) -> str:
        if target in self._targets:
            return target
        with self._targets_lock:
            if len(self._targets) < self._max_targets:
                self._targets.add(target)
                return target
        return OTHER

    def observe_reload(self, lag_seconds: float) -> None:
        self.reload_lag.observe(lag_seconds)
