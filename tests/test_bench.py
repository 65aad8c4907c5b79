"""The benchmarks run end to end and write well-formed reports (short runs; no performance is asserted)."""

from __future__ import annotations

import json

import httpx

import gateway
from gateway.bench import _load, synthetic_upstream
from gateway.bench.http_client import run_http_client_bench
from gateway.bench.overhead import run_overhead_bench

SUMMARY_KEYS = {"requests", "errors", "measured_s", "rounds", "requests_per_s", "latency_p50_ms", "latency_p99_ms",
                "ttft_p50_ms", "ttft_p99_ms"}
COMPARISON_KEYS = {"throughput_ratio", "added_latency_p50_ms", "added_latency_p99_ms", "added_ttft_p50_ms",
                   "added_ttft_p99_ms"}


def assert_served(summary: dict) -> None:
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["errors"] == 0, summary.get("error_examples")
    assert summary["requests"] > 0 and summary["requests_per_s"] > 0
    assert summary["latency_p50_ms"] > 0 and summary["ttft_p50_ms"] > 0


def test_overhead_bench_reports_gateway_against_direct():
    report = run_overhead_bench(duration_s=0.5, gateway_workers=1, levels=(1, 4), upstreams=("synthetic",))
    json.dumps(report)  # the CLI writes it as JSON
    assert report["bench"] == "overhead" and report["version"] == gateway.__version__
    metrics = report["metrics"]
    assert set(metrics["synthetic"]) == {"c1", "c4"}
    for cell in metrics["synthetic"].values():
        assert COMPARISON_KEYS <= cell.keys()
        assert cell["errors"] == 0
        assert_served(cell["direct"])
        assert_served(cell["gateway"])
        assert cell["throughput_ratio"] > 0
    assert metrics["goal_added_latency_p50_ms"] == 2.0 and metrics["goal_throughput_ratio_c64"] == 0.95
    assert metrics["added_latency_p50_ms_c1_synthetic"] == metrics["synthetic"]["c1"]["added_latency_p50_ms"]
    assert "worker" not in metrics
    assert report["config"]["levels"] == [1, 4]


def test_http_client_bench_names_a_winner():
    report = run_http_client_bench(duration_s=0.5, levels=(4,))
    json.dumps(report)
    assert report["bench"] == "http-client" and report["version"] == gateway.__version__
    metrics = report["metrics"]
    cell = metrics["c4"]
    assert cell["errors"] == 0
    assert_served(cell["direct"])
    for kind in ("httpx", "aiohttp"):
        assert_served(cell[kind])
        assert COMPARISON_KEYS <= cell[kind].keys() and cell[kind]["throughput_ratio"] > 0
    assert metrics["winner"] in {"httpx", "aiohttp"} and metrics["winner_decided_at"] == "c4"
    assert metrics["winner_throughput_advantage"] >= 1.0


async def test_synthetic_upstream_speaks_the_vllm_protocol():
    app = synthetic_upstream.create_app(chunks=3, interval_s=0.001)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fixture") as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/v1/models")).json()["data"][0]["id"] == "synthetic"
        body = {"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}
        answer = (await client.post("/v1/chat/completions", json=body)).json()
        assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"] == " w0 w1 w2"
        streamed = await client.post("/v1/chat/completions", json=body | {"stream": True,
                                                                            "stream_options": {"include_usage": True}})
    events = [e.removeprefix("data: ") for e in streamed.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == " w0 w1 w2"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 3


def test_stream_watch_times_the_first_content_across_split_reads():
    watch = _load._StreamWatch()
    role = b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
    content = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
    assert not watch.feed(role + content[:10])
    assert watch.feed(content[10:])
    assert not watch.feed(b"data: [DO")
    assert not watch.feed(b"NE]\n\n") and watch.done and watch.error is None


def test_percentile_interpolates():
    assert _load.percentile([], 50) is None
    assert _load.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert _load.percentile([0.0, 10.0], 99) == 9.9


def test_classifier_bench_reports_every_cell():
    from classifiers.bench import run_bench

    report = run_bench(large=200, requests=6, concurrency=4)
    json.dumps(report)
    assert report["bench"] == "classifier" and report["config"]["large_targets"] == 200
    metrics = report["metrics"]
    for cell in ("latency_10_targets", "latency_10_targets_unnamed_questions", "latency_200_targets"):
        assert metrics[cell]["n"] == 6 and 0 < metrics[cell]["p50_ms"] <= metrics[cell]["p99_ms"]
    for cell in ("throughput_200_token_prompts", "throughput_short_questions"):
        assert metrics[cell]["per_second"] > 0 and metrics[cell]["prompts"] >= 320
    assert metrics["p50_ratio_large_vs_10"] > 0 and metrics["large_index_build_seconds"] > 0


def test_classifier_bench_builds_its_large_targets_like_real_ones():
    """The large index's entries come from the index's own ``build_entry``: only the embeddings are synthetic."""
    from classifiers.bench import _synthetic_entry_factory, synthetic_targets
    from classifiers.encoder import load_encoder
    from classifiers.index import ClassifierConfig, build_entry, target_digest

    encoder, config = load_encoder(), ClassifierConfig()
    target = synthetic_targets(1, seed=5)[0]
    digest = target_digest(target)
    real = build_entry(target, encoder, config, digest)
    synthetic = _synthetic_entry_factory(encoder, seed=5)(target, encoder, config, digest)
    assert synthetic.positives == real.positives and synthetic.variants == real.variants
    assert synthetic.related_texts == real.related_texts and synthetic.vocabulary == real.vocabulary
    assert (synthetic.block.kinds == real.block.kinds).all()
    assert synthetic.block.vectors.shape == real.block.vectors.shape
    assert (synthetic.static_rows == real.static_rows).all()  # the gate's static vectors are the real ones
    assert not (synthetic.block.vectors == real.block.vectors).all()
