"""``bench load`` in its short form: a real gateway subprocess in front of the synthetic upstream fixture, forget
targets active, mixed traffic, a find-max ramp and a hold with zero errors; plus the open-loop pieces alone."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

import gateway
from gateway.bench import _load
from gateway.bench.load import (
    GATEWAY_CLASSES,
    START_RATE,
    interleave,
    linear_slope_per_min,
    run_load_bench,
    write_report,
)


def test_interleave_spreads_each_class_over_the_cycle():
    assert interleave({"a": 3, "b": 1}) == ["a", "a", "b", "a"]
    mixed = interleave({"x": 2, "y": 2, "z": 1})
    assert all(mixed[i] != mixed[i + 1] for i in range(len(mixed) - 1))


def test_linear_slope_recovers_a_known_leak():
    times = [0, 60, 120, 180, 240]
    slope, r2 = linear_slope_per_min(times, [500 + 2 * t / 60 for t in times])
    assert slope == pytest.approx(2.0) and r2 == pytest.approx(1.0)
    flat, _ = linear_slope_per_min(times, [500.0] * 5)
    assert flat == pytest.approx(0.0)
    assert linear_slope_per_min([0, 1], [1, 2]) is None


def test_error_kinds_are_countable():
    assert _load.error_kind("HTTP 503: busy") == "http_503"
    assert _load.error_kind("TimeoutError: ") == "timeout"
    assert _load.error_kind("ServerDisconnectedError: gone") == "connection"
    assert _load.error_kind("stream ended without data: [DONE]") == "stream_incomplete"
    assert _load.error_kind('data: {"error": {}}') == "error_event"


async def test_open_loop_keeps_its_schedule_and_accounts_for_every_request():
    async def quick(index: int) -> _load.Sample:
        start = time.perf_counter()
        await asyncio.sleep(0.005)
        return _load.Sample(start, time.perf_counter() - start, None)

    run = await _load.open_loop(40.0, 0.5, quick, drain_s=5)
    assert [s.index for s in run.sent] == list(range(20)) and run.dropped == run.unfinished == 0
    assert all(b.due_s - a.due_s == pytest.approx(0.025) for a, b in zip(run.sent, run.sent[1:]))
    # Arrivals do not wait for answers: a slow server gets the same schedule, and what it cannot finish counts.
    async def slow(index: int) -> _load.Sample:
        await asyncio.sleep(10)
        raise AssertionError("cancelled before")

    stuck = await _load.open_loop(20.0, 0.2, slow, max_in_flight=2, drain_s=0.1)
    assert stuck.dropped == 2 and stuck.unfinished == 2 and stuck.sent == []


def test_short_load_run_finds_a_rate_holds_it_with_zero_errors(tmp_path: Path):
    # The demo's two authors as targets (no benchmark data needed; their index builds in seconds).
    report = run_load_bench(duration_s=6, upstreams=("synthetic",), gateway_workers=1, step_s=2,
                            sample_interval_s=1, data_dir=None, max_rate=6)
    assert report["bench"] == "load" and report["version"] == gateway.__version__
    metrics = report["metrics"]["synthetic"]
    hold, search, memory = metrics["hold"], metrics["find_max"], metrics["memory"]

    rates = [s["offered_rate_per_s"] for s in search["steps"]]
    assert rates[0] == START_RATE["synthetic"] and max(rates) <= 6
    assert all(isinstance(s["passed"], bool) and s["sent"] > 0 for s in search["steps"])
    passed = [s["offered_rate_per_s"] for s in search["steps"] if s["passed"]]
    assert search["held_rate_per_s"] == (max(passed) if passed else START_RATE["synthetic"])
    assert hold["offered_rate_per_s"] == search["held_rate_per_s"]

    assert hold["errors"] == 0, (hold["errors_by_kind"], hold.get("error_examples"))
    classes = hold["classes"]
    for name in (*GATEWAY_CLASSES, "direct-stream"):
        assert classes[name]["requests"] > 0 and classes[name]["errors"] == 0
    assert {d.split(";")[0] for n in ("flagged-stream", "flagged-json") for d in classes[n]["decisions"]} == {"flagged"}
    assert set(classes["clean-stream"]["decisions"]) == {"clean"}
    assert set(classes["direct-stream"]["decisions"]) == {"none"}  # straight to the upstream: no gateway header
    assert classes["clean-stream"]["ttft_p50_ms"] > 0 and classes["clean-json"]["ttft_p50_ms"] is None
    # 90% of the mix goes through the gateway; requests still running at the window's end count in part.
    assert hold["sustained_requests_per_s"] >= 0.45 * hold["offered_rate_per_s"]
    assert {"added_latency_p50_ms", "added_latency_p99_ms", "added_ttft_p50_ms"} <= hold["overhead_vs_direct"].keys()

    assert memory["gateway_rss_mb_hold_start"] > 50
    assert memory["gateway_rss_mb_max"] >= memory["gateway_rss_mb_hold_end"]
    assert isinstance(memory["gateway_rss_slope_mb_per_min"], float) and memory["fitted_samples"] >= 3
    headline = report["metrics"]
    assert headline["errors_synthetic"] == 0 and headline["goal_rss_slope_mb_per_min"] == 1.0
    assert headline["sustained_requests_per_s_synthetic"] == hold["sustained_requests_per_s"]

    md = write_report(report, tmp_path / "load.json")
    assert json.loads((tmp_path / "load.json").read_text())["metrics"]["errors_synthetic"] == 0
    assert "## synthetic" in md.read_text() and (tmp_path / "load-synthetic.png").stat().st_size > 10_000


def test_cli_takes_a_rate_or_find_max_not_both():
    from typer.testing import CliRunner

    from gateway.cli import app

    result = CliRunner().invoke(app, ["bench", "load", "--rate", "5", "--find-max"])
    assert result.exit_code == 2 and "not both" in result.output
    result = CliRunner().invoke(app, ["bench", "load", "--upstream", "vllm"])
    assert result.exit_code == 2 and "both" in result.output
