"""``bench reload`` end to end in short form: a few changes and a small import (no speed is asserted here)."""

from __future__ import annotations

import json

import pytest

import gateway
from gateway.bench._redis import redis_binary
from gateway.bench.reload import run_reload_bench


@pytest.mark.skipif(redis_binary() is None, reason="needs redis-server")
def test_reload_bench_reports_propagation_and_import_visibility():
    report = run_reload_bench(changes=6, import_size=300, gateways=1, workers=2)
    json.dumps(report)
    assert report["bench"] == "reload" and report["version"] == gateway.__version__
    metrics = report["metrics"]
    assert metrics["changes"] == metrics["propagated"] == 6 and metrics["failures"] == 0
    assert metrics["workers"] == 2
    assert 0 <= metrics["propagation_p50_ms"] <= metrics["propagation_p99_ms"] <= metrics["propagation_max_ms"]
    assert metrics["observed_p99_ms"] >= metrics["propagation_p50_ms"]
    assert metrics["write_latency_p50_ms"] > 0
    assert metrics["import_targets"] == 300 and metrics["import_request_s"] > 0
    assert metrics["import_observed_s"] >= metrics["import_visible_s"] > 0
    assert metrics["goal_propagation_p99_ms"] == 100.0 and metrics["goal_import_visible_s"] == 60.0
    assert isinstance(metrics["meets_goal_propagation_p99"], bool)
    assert report["config"]["workers_per_gateway"] == 2 and report["config"]["gateways"] == 1
