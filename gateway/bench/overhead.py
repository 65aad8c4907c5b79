"""``unlearn-gateway bench overhead``: what the gateway adds between a client and its upstream.

In one run, for each upstream and each concurrency level, the same load generator streams chat completions
straight to the upstream ("direct") and through ``unlearn-gateway serve`` ("gateway"), in interleaved rounds.
Two upstreams:

- ``synthetic``: the synthetic fast upstream fixture (``gateway.bench.synthetic_upstream``), whose own cost is
  small and fixed, so the difference is the gateway's overhead. The goals apply to this upstream.
- ``worker``: the reference worker (``unlearn-gateway worker``) with a real small model. It is CPU-bound, so at
  high concurrency the model saturates and both paths mostly measure it; reported for context.

The gateway, the upstreams and the load generator share the machine, as they would on a small host.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gateway
from gateway.bench import _load
from gateway.bench._load import Target, progress

GOAL_ADDED_LATENCY_P50_MS = 2.0
GOAL_THROUGHPUT_RATIO_C64 = 0.95
DEFAULT_LEVELS = (1, 16, 64)
DEFAULT_UPSTREAMS = ("synthetic", "worker")
WORKER_MODEL_ENV = "UNLEARN_BENCH_WORKER_MODEL"
SYNTHETIC_CHUNKS = 32
SYNTHETIC_INTERVAL_MS = 10.0
WORKER_MAX_TOKENS = 16
GATEWAY_LOG_LEVEL = "warning"  # no per-request access log line, as on the fixtures
_CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Upstream:
    """How to start one upstream and what to ask it."""

    name: str
    command: list[str]
    payload: dict[str, Any]  # the request body, less "model" (learnt from the upstream's /v1/models)
    min_round_s: float  # rounds shorter than this would be mostly ramp-up and drain
    ready_timeout_s: float
    config: dict[str, Any] = field(default_factory=dict)


def _synthetic(port: int) -> Upstream:
    command = _load.module_command("gateway.bench.synthetic_upstream", "--port", str(port),
                                   "--chunks", str(SYNTHETIC_CHUNKS), "--interval-ms", str(SYNTHETIC_INTERVAL_MS))
    payload = {"messages": [{"role": "user", "content": "Say something."}], "stream": True}
    return Upstream("synthetic", command, payload, min_round_s=1.0, ready_timeout_s=60,
                    config={"fixture": "gateway.bench.synthetic_upstream", "chunks": SYNTHETIC_CHUNKS,
                            "interval_ms": SYNTHETIC_INTERVAL_MS})


def worker_model(explicit: str | None = None) -> tuple[str | None, str]:
    """The reference worker's model and where that choice came from: the argument, the shipped demo model,
    or ``$UNLEARN_BENCH_WORKER_MODEL`` (a checkpoint path) while the demo model is not built yet.
    """
    from models import MODELS_DIR

    if explicit:
        return explicit, "argument"
    if (MODELS_DIR / "demo-full" / "config.json").is_file():
        return "demo", "shipped demo model (models/demo-full)"
    if os.environ.get(WORKER_MODEL_ENV):
        return os.environ[WORKER_MODEL_ENV], f"${WORKER_MODEL_ENV} (models/demo-full/config.json does not exist)"
    return None, f"no model: models/demo-full/config.json does not exist and ${WORKER_MODEL_ENV} is not set"


def _worker(port: int, model: str, source: str) -> Upstream:
    command = _load.cli_command("worker", "--model", model, "--port", str(port))
    payload = {"messages": [{"role": "user", "content": "What genre does Carmen Montenegro write in?"}],
               "stream": True, "max_tokens": WORKER_MAX_TOKENS, "temperature": 0}
    return Upstream("worker", command, payload, min_round_s=2.0, ready_timeout_s=300,
                    config={"command": "unlearn-gateway worker --model MODEL --port P", "model": model,
                            "model_source": source, "max_tokens": WORKER_MAX_TOKENS, "temperature": 0})


def _cell(concurrency: int, tallies: dict[str, _load.Tally]) -> dict[str, Any]:
    direct, via = tallies["direct"].summary(), tallies["gateway"].summary()
    return {"concurrency": concurrency, **_load.compare(direct, via), "errors": direct["errors"] + via["errors"],
            "direct": direct, "gateway": via}


async def _measure(direct_url: str, gateway_url: str, upstream: Upstream, model_id: str, levels: Sequence[int],
                   duration_s: float) -> dict[str, Any]:
    targets = [Target("direct", direct_url + _CHAT), Target("gateway", gateway_url + _CHAT)]
    body = _load.request_body(upstream.payload | {"model": model_id})
    rounds = _load.rounds_for(duration_s, upstream.min_round_s)
    cells: dict[str, Any] = {}
    async with _load.client_session() as session:
        progress(f"{upstream.name}: warming up at {max(levels)} streams")
        await _load.warm_up(session, targets, body, max(levels), min(1.0, duration_s))
        for level in levels:
            progress(f"{upstream.name}: {level} streams, {rounds} rounds x {duration_s / rounds:.2f} s per path")
            cell = _cell(level, await _load.measure_interleaved(session, targets, body, level, duration_s, rounds))
            progress(f"{upstream.name} c{level}: {cell['direct']['requests_per_s']:.1f} -> "
                     f"{cell['gateway']['requests_per_s']:.1f} req/s (ratio {cell['throughput_ratio']}), "
                     f"added p50 {cell['added_latency_p50_ms']} ms, p99 {cell['added_latency_p99_ms']} ms, "
                     f"errors {cell['errors']}")
            cells[f"c{level}"] = cell
    return cells


def _bench_upstream(upstream: Upstream, upstream_port: int, levels: Sequence[int], duration_s: float,
                    gateway_workers: int, log_dir: Path) -> dict[str, Any]:
    """Start the upstream and a gateway in front of it, measure every level, stop both."""
    with ExitStack() as stack:
        progress(f"{upstream.name}: starting the upstream")
        server = _load.start_server(upstream.name, upstream.command, upstream_port, log_dir,
                                    env=_load.clean_env(), timeout_s=upstream.ready_timeout_s)
        stack.callback(server.stop)
        model_id = _load.first_model_id(server.url)
        gateway_port = _load.free_port()
        env = _load.clean_env(engine="vllm", worker_urls=server.url, log_level=GATEWAY_LOG_LEVEL)
        progress(f"{upstream.name}: starting the gateway ({gateway_workers} workers)")
        gateway_server = _load.start_server(
            f"gateway-{upstream.name}",
            _load.cli_command("serve", "--host", "127.0.0.1", "--port", str(gateway_port),
                              "--workers", str(gateway_workers)),
            gateway_port, log_dir, env=env, ready_path="/ready")
        stack.callback(gateway_server.stop)
        return _load.run_async(_measure(server.url, gateway_server.url, upstream, model_id, levels, duration_s))


def _summary(metrics: dict[str, Any], levels: Sequence[int]) -> dict[str, Any]:
    """Flat headline keys next to the goals, so the report explains itself without reading the cells."""
    flat: dict[str, Any] = {"goal_added_latency_p50_ms": GOAL_ADDED_LATENCY_P50_MS,
                            "goal_throughput_ratio_c64": GOAL_THROUGHPUT_RATIO_C64}
    for name, cells in metrics.items():
        for level in levels:
            cell = cells.get(f"c{level}")
            if cell is not None:
                flat[f"added_latency_p50_ms_c{level}_{name}"] = cell["added_latency_p50_ms"]
                flat[f"throughput_ratio_c{level}_{name}"] = cell["throughput_ratio"]
    added = flat.get("added_latency_p50_ms_c1_synthetic")
    if added is not None:
        flat["meets_goal_added_latency_p50_c1_synthetic"] = added <= GOAL_ADDED_LATENCY_P50_MS
    ratio = flat.get("throughput_ratio_c64_synthetic")
    if ratio is not None:
        flat["meets_goal_throughput_ratio_c64_synthetic"] = ratio >= GOAL_THROUGHPUT_RATIO_C64
    return flat


def run_overhead_bench(duration_s: float = 8.0, gateway_workers: int = 2, levels: Sequence[int] = DEFAULT_LEVELS,
                       upstreams: Sequence[str] = DEFAULT_UPSTREAMS, worker_model_name: str | None = None
                       ) -> dict[str, Any]:
    """Run the benchmark and return its report (``duration_s``: seconds of load per path and level)."""
    unknown = set(upstreams) - set(DEFAULT_UPSTREAMS)
    if unknown:
        raise ValueError(f"unknown upstreams {sorted(unknown)}; choose from {DEFAULT_UPSTREAMS}")
    levels = tuple(levels)
    config: dict[str, Any] = {
        "duration_s_per_path_and_level": duration_s, "levels": list(levels), "gateway_workers": gateway_workers,
        "gateway_command": "unlearn-gateway serve --port P --workers N",
        "gateway_env": {"UNLEARN_ENGINE": "vllm", "UNLEARN_WORKER_URLS": "<upstream>",
                        "UNLEARN_LOG_LEVEL": GATEWAY_LOG_LEVEL},
        "load_generator": f"aiohttp streaming clients, closed loop, {_load.client_loop_name()} event loop",
        "throughput": _load.THROUGHPUT_DEFINITION,
        "interleaving": "per level, rounds alternate direct/gateway in ABBA order",
        "goals_apply_to": "the synthetic upstream: it isolates the gateway; at 64 streams a CPU-bound worker "
                          "saturates and both paths mostly measure the model",
        "upstreams": {}, "machine": _load.machine(),
    }
    metrics: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        for name in upstreams:
            port = _load.free_port()
            if name == "synthetic":
                upstream = _synthetic(port)
            else:
                model, source = worker_model(worker_model_name)
                if model is None:
                    progress(f"worker: skipped ({source})")
                    metrics[name] = {"skipped": source}
                    config["upstreams"][name] = {"model_source": source}
                    continue
                upstream = _worker(port, model, source)
            config["upstreams"][name] = upstream.config | {
                "min_round_s": upstream.min_round_s, "rounds_per_level": _load.rounds_for(duration_s,
                                                                                          upstream.min_round_s)}
            try:
                metrics[name] = _bench_upstream(upstream, port, levels, duration_s, gateway_workers, Path(tmp))
            except RuntimeError as exc:
                if name == "synthetic":  # the fixture failing is a bug, not a finding
                    raise
                progress(f"{name}: failed: {exc}")
                metrics[name] = {"error": str(exc)[-2000:]}
    config["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    measured = {k: v for k, v in metrics.items() if "skipped" not in v and "error" not in v}
    metrics |= _summary(measured, levels)
    return {"bench": "overhead", "metrics": metrics, "config": config, "version": gateway.__version__}
