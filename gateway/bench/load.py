"""``unlearn-gateway bench load``: sustained mixed traffic through the gateway, its memory watched.

Per upstream (run one after the other, each behind its own gateway):

- ``synthetic``: the synthetic fast upstream fixture (``gateway.bench.synthetic_upstream``): isolates the gateway.
- ``worker``: the reference worker (``unlearn-gateway worker``) with the real demo model, CPU-bound.

The gateway is an ``unlearn-gateway serve`` subprocess (``UNLEARN_ENGINE=vllm``) whose process tree's resident
memory is sampled every few seconds. Forget targets are active: TOFU forget authors built exactly as
``eval classifier`` builds them when the benchmark data is present, else the demo's two authors in our own words;
their policies cycle through guard, eco and refuse. An open-loop generator (``_load.open_loop``) sends a fixed
interleaving of traffic classes: clean and flagged prompts, streaming and not, through the gateway, plus a share of
clean streams straight to the upstream ("direct") so the gateway's added latency is measured under the same load.

``--rate R`` holds R requests/s for ``--duration`` seconds. ``--find-max`` first raises the rate in short steps
(x1.5) while a step has zero errors and its p99 latency stays within the bound (by default twice the first,
light step's p99), tries once between the last passing and the first failing rate, then holds the highest
passing rate for ``--duration`` seconds. Memory growth is a least-squares slope over the hold after its warm-up.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import numpy as np

import gateway
from gateway.bench import _load
from gateway.bench._load import OpenLoopRun, Sample, ServerProcess, progress
from gateway.bench.overhead import SYNTHETIC_CHUNKS, SYNTHETIC_INTERVAL_MS, WORKER_MAX_TOKENS, worker_model
from gateway.bench.reload import Fleet, discover, wait_everywhere
from gateway.reports import write_json_report

UPSTREAMS = ("synthetic", "worker")
GOAL_ERRORS = 0
GOAL_RSS_SLOPE_MB_PER_MIN = 1.0  # "memory flat": under 10 MB over a 10-minute hold, after warm-up
POLICY_CYCLE = ("guard", "eco", "refuse")
START_RATE = {"synthetic": 4.0, "worker": 0.5}  # requests/s of the first, light find-max step
MAX_RATE = {"synthetic": 2000.0, "worker": 50.0}
STEP_FACTOR = 1.5
MAX_STEPS = 14
BOUND_FACTOR = 2.0  # default p99 bound: this many times the first step's p99
SEND_LAG_LIMIT_MS = 100.0  # a step whose generator fell further behind than this measured the client, not the server
REQUEST_TIMEOUT_S = 60.0
DRAIN_S = 60.0
TARGET_WAIT_S = 300.0
ADMIN_KEY = "bench-load-admin-key"
LOG_LEVEL = "warning"  # no per-request access log line
_CHAT = "/v1/chat/completions"
Store = Literal["auto", "redis", "embedded"]


@dataclass(frozen=True)
class TrafficClass:
    name: str
    flagged: bool  # a forget-target prompt
    stream: bool
    direct: bool = False  # straight to the upstream, bypassing the gateway (the overhead baseline)


CLASSES = (TrafficClass("clean-stream", False, True), TrafficClass("clean-json", False, False),
           TrafficClass("flagged-stream", True, True), TrafficClass("flagged-json", True, False),
           TrafficClass("direct-stream", False, True, direct=True))
DEFAULT_MIX = {"clean-stream": 3, "clean-json": 3, "flagged-stream": 2, "flagged-json": 1, "direct-stream": 1}
GATEWAY_CLASSES = tuple(c.name for c in CLASSES if not c.direct)


def interleave(weights: dict[str, int]) -> list[str]:
    """Smooth weighted round-robin: the classes spread evenly over one cycle (3:1 -> a a b a, not a a a b)."""
    total = sum(weights.values())
    current = dict.fromkeys(weights, 0)
    order: list[str] = []
    for _ in range(total):
        for name, weight in weights.items():
            current[name] += weight
        chosen = max(current, key=current.__getitem__)
        current[chosen] -= total
        order.append(chosen)
    return order


# -- what is sent -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """The targets an operator registered and the prompts the clients send."""

    targets: list[dict[str, Any]]  # admin API bodies
    flagged: list[str]
    clean: list[str]
    source: str


def build_workload(data_dir: Path | None, n_targets: int, max_clean: int = 200) -> Workload:
    """TOFU targets as ``eval classifier`` builds them (§7) when the data is there, else the demo's authors.

    Flagged prompts are the targets' held-back forget questions, clean ones retain-author questions the targets
    were not built from (benchmark text read at run time, never stored)."""
    if data_dir is not None and (data_dir / "tofu" / "forget10.json").is_file():
        from classifiers.evaluation.suites import tofu

        suite = tofu(data_dir, limit_authors=n_targets)
        splits = {s.name: s for s in suite.splits}
        clean = [i.text for i in splits["retain90_rest"].items]
        bodies = [t.model_dump(mode="json") for t in suite.targets]
        return Workload(_with_policies(bodies), [i.text for i in splits["forget_heldback"].items],
                        clean[::max(1, len(clean) // max_clean)][:max_clean],
                        f"TOFU forget10, first {len(bodies)} authors ({data_dir / 'tofu'})")
    from gateway.demo import FORGET, RETAIN

    return Workload(_with_policies([dict(target) for _, target in FORGET]), [q for q, _ in FORGET], list(RETAIN),
                    "the demo's two forget-set authors and two retain-set questions (no benchmark data found)")


def _with_policies(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [body | {"policy": {"method": POLICY_CYCLE[i % len(POLICY_CYCLE)]}} for i, body in enumerate(bodies)]


@dataclass(frozen=True)
class Requests:
    """Pre-encoded bodies per class (the generator's CPU goes to sending, not to JSON) and where they go."""

    order: list[str]
    bodies: dict[str, list[bytes]]
    urls: dict[str, str]

    def send(self, session: aiohttp.ClientSession, index: int) -> Awaitable[Sample]:
        name = self.order[index % len(self.order)]
        bodies = self.bodies[name]
        body = bodies[(index // len(self.order)) % len(bodies)]
        stream = _CLASS[name].stream
        return (_load.stream_once if stream else _load.complete_once)(session, self.urls[name], body)

    def class_of(self, index: int) -> str:
        return self.order[index % len(self.order)]


_CLASS = {c.name: c for c in CLASSES}


def build_requests(workload: Workload, model_id: str, gateway_url: str, upstream_url: str,
                   max_tokens: int | None, mix: dict[str, int]) -> Requests:
    def body(prompt: str, stream: bool) -> bytes:
        payload: dict[str, Any] = {"model": model_id, "messages": [{"role": "user", "content": prompt}],
                                   "stream": stream, "temperature": 0}
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        return _load.request_body(payload)

    bodies = {c.name: [body(p, c.stream) for p in (workload.flagged if c.flagged else workload.clean)]
              for c in CLASSES if mix.get(c.name)}
    urls = {c.name: (upstream_url if c.direct else gateway_url) + _CHAT for c in CLASSES if mix.get(c.name)}
    return Requests(interleave({k: v for k, v in mix.items() if v}), bodies, urls)


# -- what is measured -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemorySample:
    t_s: float  # since the run's clock started
    phase: str
    gateway_rss_mb: float | None
    gateway_cpu_s: float | None
    upstream_rss_mb: float | None
    load_1m: float


@dataclass
class Recorder:
    """Samples the gateway's and the upstream's process trees every ``interval_s`` while load runs."""

    gateway_pid: int
    upstream_pid: int
    interval_s: float
    origin: float = field(default_factory=time.perf_counter)
    phase: str = "idle"
    samples: list[MemorySample] = field(default_factory=list)

    def sample(self) -> None:
        gateway_usage = _load.tree_usage(self.gateway_pid)
        upstream_usage = _load.tree_usage(self.upstream_pid)
        self.samples.append(MemorySample(
            round(time.perf_counter() - self.origin, 3), self.phase,
            None if gateway_usage is None else round(gateway_usage[0] / 2**20, 2),
            None if gateway_usage is None else round(gateway_usage[1], 2),
            None if upstream_usage is None else round(upstream_usage[0] / 2**20, 2),
            round(os.getloadavg()[0], 2)))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)


def linear_slope_per_min(times_s: Sequence[float], values: Sequence[float]) -> tuple[float, float] | None:
    """Least-squares slope (units per minute) and R^2 of ``values`` over ``times_s``; None under 3 points."""
    if len(times_s) < 3:
        return None
    t = np.asarray(times_s, dtype=float) / 60
    y = np.asarray(values, dtype=float)
    slope, intercept = np.polyfit(t, y, 1)
    residual = float(np.sum((y - (slope * t + intercept)) ** 2))
    spread = float(np.sum((y - y.mean()) ** 2))
    return float(slope), (1 - residual / spread) if spread > 0 else 1.0


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def phase_summary(run: OpenLoopRun, requests: Requests, rate: float) -> dict[str, Any]:
    """Per class and overall (gateway classes): rates, latencies, TTFT, errors by kind, decisions seen."""
    by_class: dict[str, list[Sample]] = {name: [] for name in requests.bodies}
    for sent in run.sent:
        by_class[requests.class_of(sent.index)].append(sent.sample)
    classes: dict[str, Any] = {}
    for name, samples in by_class.items():
        summary = _load.window_tally(samples, run.start_s, run.window_s).summary()
        summary["decisions"] = dict(Counter(s.decision or "none" for s in samples if s.error is None))
        classes[name] = summary
    through_gateway = [s for name, samples in by_class.items() if not _CLASS[name].direct for s in samples]
    overall = _load.window_tally(through_gateway, run.start_s, run.window_s).summary()
    kinds = Counter(_load.error_kind(s.sample.error) for s in run.sent if s.sample.error is not None)
    if run.dropped:
        kinds["dropped_in_flight_cap"] += run.dropped
    if run.unfinished:
        kinds["unfinished_after_drain"] += run.unfinished
    lags = [s.send_lag_s for s in run.sent]
    result: dict[str, Any] = {
        "offered_rate_per_s": round(rate, 3), "window_s": round(run.window_s, 3), "sent": len(run.sent),
        "sustained_requests_per_s": overall["requests_per_s"],
        "direct_requests_per_s": round(sum(c["requests_per_s"] for n, c in classes.items() if _CLASS[n].direct), 3),
        "errors": sum(kinds.values()), "errors_by_kind": dict(kinds),
        "gateway_latency_p50_ms": overall["latency_p50_ms"], "gateway_latency_p99_ms": overall["latency_p99_ms"],
        "gateway_ttft_p50_ms": overall["ttft_p50_ms"], "gateway_ttft_p99_ms": overall["ttft_p99_ms"],
        "send_lag_p99_ms": _ms(_load.percentile(lags, 99)), "send_lag_max_ms": _ms(max(lags, default=None)),
        "classes": classes,
    }
    examples = [e for c in classes.values() for e in c.get("error_examples", ())]
    if examples:
        result["error_examples"] = examples[:5]
    if "direct-stream" in classes and "clean-stream" in classes:
        comparison = _load.compare(classes["direct-stream"], classes["clean-stream"])
        comparison.pop("throughput_ratio")  # the mix, not the gateway, sets each class's rate
        result["overhead_vs_direct"] = comparison | {"compared": "clean-stream (via gateway) vs direct-stream, "
                                                                 "same prompts, same time"}
    return result


def timeline(run: OpenLoopRun, origin: float, bucket_s: float, phase: str) -> list[dict[str, Any]]:
    """Per bucket of completion time: completions/s and p50/p99 latency (the plot's middle and bottom panels)."""
    buckets: dict[int, list[float]] = {}
    for sent in run.sent:
        sample = sent.sample
        if sample.error is None:
            done = sample.started_s + sample.latency_s - origin
            buckets.setdefault(int(done // bucket_s), []).append(sample.latency_s)
    return [{"t_s": round((k + 0.5) * bucket_s, 2), "phase": phase, "completed_per_s": round(len(v) / bucket_s, 3),
             "latency_p50_ms": _ms(_load.percentile(v, 50)), "latency_p99_ms": _ms(_load.percentile(v, 99))}
            for k, v in sorted(buckets.items())]


def memory_summary(samples: Sequence[MemorySample], warmup_s: float) -> dict[str, Any]:
    """RSS at launch, over the hold and its growth slope after ``warmup_s`` of hold (gateway and upstream)."""
    hold = [s for s in samples if s.phase == "hold" and s.gateway_rss_mb is not None]
    launch = next((s.gateway_rss_mb for s in samples if s.gateway_rss_mb is not None), None)
    out: dict[str, Any] = {"samples": len(samples), "warmup_s": round(warmup_s, 1), "gateway_rss_mb_at_launch": launch}
    if not hold:
        return out
    rss = [s.gateway_rss_mb or 0.0 for s in hold]
    fitted = [s for s in hold if s.t_s >= hold[0].t_s + warmup_s]
    fit = linear_slope_per_min([s.t_s for s in fitted], [s.gateway_rss_mb or 0.0 for s in fitted])
    # A leak grows in both halves; a one-time step (a code path's first use, an arena) only in the first.
    late = [s for s in hold if s.t_s >= (hold[0].t_s + hold[-1].t_s) / 2]
    late_fit = linear_slope_per_min([s.t_s for s in late], [s.gateway_rss_mb or 0.0 for s in late])
    upstream = [s for s in fitted if s.upstream_rss_mb is not None]
    upstream_fit = linear_slope_per_min([s.t_s for s in upstream], [s.upstream_rss_mb or 0.0 for s in upstream])
    out |= {
        "gateway_rss_mb_hold_start": rss[0], "gateway_rss_mb_hold_end": rss[-1], "gateway_rss_mb_max": max(rss),
        "gateway_rss_growth_mb_over_hold": round(rss[-1] - rss[0], 2),
        "gateway_rss_slope_mb_per_min": None if fit is None else round(fit[0], 4),
        "gateway_rss_fit_r2": None if fit is None else round(fit[1], 4),
        "gateway_rss_slope_mb_per_min_second_half": None if late_fit is None else round(late_fit[0], 4),
        "fitted_samples": len(fitted),
        "upstream_rss_mb_hold_start": hold[0].upstream_rss_mb, "upstream_rss_mb_hold_end": hold[-1].upstream_rss_mb,
        "upstream_rss_slope_mb_per_min": None if upstream_fit is None else round(upstream_fit[0], 4),
    }
    cpu = [s.gateway_cpu_s for s in hold if s.gateway_cpu_s is not None]
    if len(cpu) >= 2 and hold[-1].t_s > hold[0].t_s:
        out["gateway_cpu_cores_busy"] = round((cpu[-1] - cpu[0]) / (hold[-1].t_s - hold[0].t_s), 3)
    return out


# -- the run ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    duration_s: float
    rate: float | None  # None: find the highest passing rate first
    step_s: float
    p99_bound_ms: float | None
    sample_interval_s: float
    max_rate: float | None = None


def passes(step: dict[str, Any], bound_ms: float) -> bool:
    p99 = step["gateway_latency_p99_ms"]
    lag = step["send_lag_p99_ms"]
    return (step["errors"] == 0 and p99 is not None and p99 <= bound_ms
            and (lag is None or lag <= SEND_LAG_LIMIT_MS))


async def _run_phase(session: aiohttp.ClientSession, requests: Requests, recorder: Recorder, rate: float,
                     duration_s: float, phase: str, series: list[dict[str, Any]]) -> dict[str, Any]:
    recorder.phase = phase
    run = await _load.open_loop(rate, duration_s, lambda i: requests.send(session, i), drain_s=DRAIN_S)
    series += timeline(run, recorder.origin, recorder.interval_s, phase)
    return phase_summary(run, requests, rate)


async def find_max(session: aiohttp.ClientSession, requests: Requests, recorder: Recorder, upstream: str,
                   plan: Plan, series: list[dict[str, Any]]) -> dict[str, Any]:
    """Raise the rate by ``STEP_FACTOR`` per short step until a step fails, then try once in between."""
    rate = START_RATE[upstream]
    ceiling = plan.max_rate or MAX_RATE[upstream]
    steps: list[dict[str, Any]] = []
    bound = plan.p99_bound_ms
    best: float | None = None
    failed: float | None = None
    for _ in range(MAX_STEPS):
        step = await _run_phase(session, requests, recorder, rate, plan.step_s, f"step {rate:g}/s", series)
        if bound is None:  # the first, light step sets the bound
            bound = BOUND_FACTOR * (step["gateway_latency_p99_ms"] or 0.0)
        step["passed"] = passes(step, bound)
        steps.append(step)
        progress(f"{upstream}: step {rate:g} req/s -> {step['sustained_requests_per_s']} req/s, p99 "
                 f"{step['gateway_latency_p99_ms']} ms (bound {bound:.0f}), errors {step['errors']}, "
                 f"{'pass' if step['passed'] else 'FAIL'}")
        if not step["passed"]:
            failed = rate
            break
        best = rate
        if rate >= ceiling:
            break
        rate = min(ceiling, rate * STEP_FACTOR)
    if best is not None and failed is not None:
        between = round((best * failed) ** 0.5, 3)
        step = await _run_phase(session, requests, recorder, between, plan.step_s, f"step {between:g}/s", series)
        step["passed"] = passes(step, bound or 0.0)
        steps.append(step)
        progress(f"{upstream}: step {between:g} req/s (between) -> p99 {step['gateway_latency_p99_ms']} ms, "
                 f"errors {step['errors']}, {'pass' if step['passed'] else 'FAIL'}")
        if step["passed"]:
            best = between
    return {"steps": steps, "p99_bound_ms": None if bound is None else round(bound, 2),
            "p99_bound_source": "given" if plan.p99_bound_ms is not None else
            f"{BOUND_FACTOR} x the first step's p99", "found_rate_per_s": best,
            "held_rate_per_s": best if best is not None else START_RATE[upstream],
            "note": None if best is not None else "no step passed: held the first step's rate"}


async def _register_targets(session: aiohttp.ClientSession, gateway_url: str, workload: Workload,
                            workers: int) -> int:
    """One import (one version), then wait until every gateway worker serves it with its index built."""
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    async with session.post(gateway_url + "/admin/targets/import?mode=replace", json=workload.targets,
                            headers=headers) as response:
        answer = await response.json()
        if response.status >= 300:
            raise RuntimeError(f"target import failed: HTTP {response.status}: {answer}")
    version = answer["version"]
    fleet = Fleet([gateway_url], workers)
    connector = aiohttp.TCPConnector(force_close=True, limit=0)  # a new connection per poll: any worker answers
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as polls:
        await discover(polls, fleet)
        if await wait_everywhere(polls, fleet, version, TARGET_WAIT_S) is None:
            raise RuntimeError(f"target version {version} not served by every worker within {TARGET_WAIT_S:.0f} s")
    return version


async def _check_requests(session: aiohttp.ClientSession, requests: Requests) -> dict[str, Any]:
    """Each class once per prompt (a few): every class must answer, and flagged prompts must be flagged, or the
    run would measure something other than what it claims."""
    seen: dict[str, Counter[str]] = {}
    for name, bodies in requests.bodies.items():
        send = _load.stream_once if _CLASS[name].stream else _load.complete_once
        samples = [await send(session, requests.urls[name], body) for body in bodies[:3]]
        failed = [s.error for s in samples if s.error is not None]
        if failed:
            raise RuntimeError(f"warm-up: {name} failed {len(failed)}/{len(samples)}: {failed[0]}")
        seen[name] = Counter(s.decision or "none" for s in samples)
    flagged = sum(n for name in ("flagged-stream", "flagged-json") for d, n in seen.get(name, {}).items()
                  if d.startswith("flagged"))
    if not flagged:
        raise RuntimeError(f"warm-up: no flagged prompt was flagged ({seen}); the targets are not active")
    return {name: dict(counter) for name, counter in seen.items()}


async def _drive(upstream: str, gateway_server: ServerProcess, upstream_server: ServerProcess, workload: Workload,
                 plan: Plan, workers: int, max_tokens: int | None, mix: dict[str, int]) -> dict[str, Any]:
    recorder = Recorder(gateway_server.process.pid, upstream_server.process.pid, plan.sample_interval_s)
    sampler = asyncio.create_task(recorder.run())
    series: list[dict[str, Any]] = []
    try:
        async with _load.client_session(REQUEST_TIMEOUT_S) as session:
            recorder.phase = "targets"
            version = await _register_targets(session, gateway_server.url, workload, workers)
            model_id = _load.first_model_id(gateway_server.url)
            requests = build_requests(workload, model_id, gateway_server.url, upstream_server.url, max_tokens, mix)
            recorder.phase = "warm-up"
            decisions = await _check_requests(session, requests)
            progress(f"{upstream}: targets version {version} active; warm-up decisions {decisions}")
            search = None
            rate = plan.rate
            if rate is None:
                search = await find_max(session, requests, recorder, upstream, plan, series)
                rate = search["held_rate_per_s"]
            progress(f"{upstream}: holding {rate:g} req/s for {plan.duration_s:.0f} s")
            hold = await _run_phase(session, requests, recorder, rate, plan.duration_s, "hold", series)
            recorder.phase = "after"
            recorder.sample()
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    warmup = min(60.0, 0.2 * plan.duration_s)
    memory = memory_summary(recorder.samples, warmup)
    progress(f"{upstream}: held {hold['sustained_requests_per_s']} req/s, p99 {hold['gateway_latency_p99_ms']} ms, "
             f"errors {hold['errors']}, RSS slope {memory.get('gateway_rss_slope_mb_per_min')} MB/min")
    metrics = {"hold": hold, "memory": memory, "warm_up_decisions": decisions, "targets_version": version}
    if search is not None:
        metrics["find_max"] = search
    return {"metrics": metrics, "series": {"timeline": series, "memory": [vars(s) for s in recorder.samples]}}


def _start_upstream(name: str, stack: ExitStack, log_dir: Path, model: str | None) -> ServerProcess:
    port = _load.free_port()
    if name == "synthetic":
        command = _load.module_command("gateway.bench.synthetic_upstream", "--port", str(port), "--chunks",
                                       str(SYNTHETIC_CHUNKS), "--interval-ms", str(SYNTHETIC_INTERVAL_MS))
        timeout = 60.0
    else:
        command = _load.cli_command("worker", "--model", model or "demo", "--port", str(port))
        timeout = 300.0
    server = _load.start_server(name, command, port, log_dir, env=_load.clean_env(), timeout_s=timeout)
    stack.callback(server.stop)
    return server


def _store_settings(store: Store, stack: ExitStack, log_dir: Path) -> tuple[dict[str, str], str]:
    from gateway.bench._redis import redis_binary, start_redis

    if store == "redis" or (store == "auto" and redis_binary() is not None):
        server = start_redis()
        stack.callback(server.stop)
        return {"store_url": server.url}, "redis-server on loopback (no persistence), one per upstream run"
    return {"store_path": str(log_dir / "targets.db")}, "embedded file store (redis-server not installed)"


def _bench_upstream(name: str, workload: Workload, plan: Plan, workers: int, store: Store, log_dir: Path,
                    model: str | None, mix: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any], str]:
    with ExitStack() as stack:
        progress(f"{name}: starting the upstream")
        upstream = _start_upstream(name, stack, log_dir, model)
        store_env, store_note = _store_settings(store, stack, log_dir)
        port = _load.free_port()
        env = _load.clean_env(engine="vllm", worker_urls=upstream.url, log_level=LOG_LEVEL, admin_keys=ADMIN_KEY,
                              **store_env)
        progress(f"{name}: starting the gateway ({workers} workers)")
        gateway_server = _load.start_server(
            f"gateway-{name}", _load.cli_command("serve", "--host", "127.0.0.1", "--port", str(port), "--workers",
                                                 str(workers)),
            port, log_dir, env=env, ready_path="/ready", timeout_s=180)
        stack.callback(gateway_server.stop)
        max_tokens = WORKER_MAX_TOKENS if name == "worker" else None
        result = _load.run_async(_drive(name, gateway_server, upstream, workload, plan, workers, max_tokens, mix))
        return result["metrics"], result["series"], store_note


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Flat keys next to the goals, so the report explains itself."""
    flat: dict[str, Any] = {"goal_errors": GOAL_ERRORS, "goal_rss_slope_mb_per_min": GOAL_RSS_SLOPE_MB_PER_MIN}
    for name, m in metrics.items():
        if "hold" not in m:
            continue
        hold, memory = m["hold"], m["memory"]
        slope = memory.get("gateway_rss_slope_mb_per_min")
        flat |= {f"sustained_requests_per_s_{name}": hold["sustained_requests_per_s"],
                 f"latency_p50_ms_{name}": hold["gateway_latency_p50_ms"],
                 f"latency_p99_ms_{name}": hold["gateway_latency_p99_ms"],
                 f"errors_{name}": hold["errors"],
                 f"rss_slope_mb_per_min_{name}": slope,
                 f"rss_slope_second_half_mb_per_min_{name}": memory.get("gateway_rss_slope_mb_per_min_second_half"),
                 f"rss_growth_mb_over_hold_{name}": memory.get("gateway_rss_growth_mb_over_hold"),
                 f"meets_goal_errors_{name}": hold["errors"] == GOAL_ERRORS,
                 f"meets_goal_rss_slope_{name}": slope is not None and slope <= GOAL_RSS_SLOPE_MB_PER_MIN}
        if "overhead_vs_direct" in hold:
            flat[f"added_latency_p50_ms_{name}"] = hold["overhead_vs_direct"]["added_latency_p50_ms"]
    return flat


def run_load_bench(duration_s: float = 600.0, rate: float | None = None, upstreams: Sequence[str] = UPSTREAMS,
                   gateway_workers: int = 2, step_s: float = 20.0, p99_bound_ms: float | None = None,
                   sample_interval_s: float = 5.0, n_targets: int = 3, data_dir: Path | None = None,
                   store: Store = "auto", worker_model_name: str | None = None, max_rate: float | None = None,
                   mix: dict[str, int] | None = None) -> dict[str, Any]:
    """Run the benchmark and return its report (``rate`` None: find the highest passing rate, then hold it)."""
    unknown = set(upstreams) - set(UPSTREAMS)
    if unknown:
        raise ValueError(f"unknown upstreams {sorted(unknown)}; choose from {UPSTREAMS}")
    mix = dict(mix or DEFAULT_MIX)
    if set(mix) - set(_CLASS):
        raise ValueError(f"unknown traffic classes {sorted(set(mix) - set(_CLASS))}")
    plan = Plan(duration_s, rate, step_s, p99_bound_ms, sample_interval_s, max_rate)
    workload = build_workload(data_dir, n_targets)
    config: dict[str, Any] = {
        "duration_s": duration_s, "mode": "fixed rate" if rate is not None else "find-max, then hold",
        "rate_per_s": rate, "step_s": step_s, "step_factor": STEP_FACTOR, "start_rates": START_RATE,
        "max_steps": MAX_STEPS, "p99_bound_ms": p99_bound_ms, "bound_factor": BOUND_FACTOR,
        "send_lag_limit_ms": SEND_LAG_LIMIT_MS, "max_rate": max_rate,
        "pass_rule": "zero errors, gateway p99 latency <= bound, generator send lag p99 <= limit",
        "mix": mix, "mix_order": interleave(mix),
        "classes": {c.name: {"flagged": c.flagged, "stream": c.stream, "via": "direct" if c.direct else "gateway"}
                    for c in CLASSES if mix.get(c.name)},
        "targets": [{"id": t.get("id"), "name": t["name"], "policy": t["policy"]["method"]} for t in workload.targets],
        "workload": workload.source, "flagged_prompts": len(workload.flagged), "clean_prompts": len(workload.clean),
        "gateway_command": "unlearn-gateway serve --port P --workers N", "gateway_workers": gateway_workers,
        "gateway_env": {"UNLEARN_ENGINE": "vllm", "UNLEARN_WORKER_URLS": "<upstream>", "UNLEARN_LOG_LEVEL": LOG_LEVEL},
        "load_generator": f"aiohttp, open loop (evenly spaced arrivals), {_load.client_loop_name()} event loop, "
                          f"request timeout {REQUEST_TIMEOUT_S:.0f} s, drain {DRAIN_S:.0f} s",
        "throughput": _load.THROUGHPUT_DEFINITION, "sample_interval_s": sample_interval_s,
        "rss": "resident set size of the gateway's whole process tree (supervisor + workers), psutil",
        "rss_slope": "least-squares fit over the hold, after its first min(60 s, 20%) of warm-up; also over the "
                     "hold's second half alone (a leak grows in both, a one-time step only in the first)",
        "upstreams": {}, "machine": _load.machine(),
    }
    metrics: dict[str, Any] = {}
    series: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        for name in upstreams:
            model = None
            if name == "worker":
                model, source = worker_model(worker_model_name)
                if model is None:
                    progress(f"worker: skipped ({source})")
                    metrics[name] = {"skipped": source}
                    continue
                config["upstreams"][name] = {"command": "unlearn-gateway worker --model MODEL --port P",
                                             "model": model, "model_source": source, "max_tokens": WORKER_MAX_TOKENS}
            else:
                config["upstreams"][name] = {"fixture": "gateway.bench.synthetic_upstream",
                                             "chunks": SYNTHETIC_CHUNKS, "interval_ms": SYNTHETIC_INTERVAL_MS}
            metrics[name], series[name], config["store"] = _bench_upstream(
                name, workload, plan, gateway_workers, store, Path(tmp), model, mix)
    config["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    metrics |= _headline(metrics)
    return {"bench": "load", "metrics": metrics, "config": config, "version": gateway.__version__,
            "series": series}


def write_report(report: dict[str, Any], json_path: Path) -> Path:
    """The JSON report, and its Markdown summary with plots beside it; returns the Markdown path."""
    from gateway.bench.load_report import write_markdown

    write_json_report(json_path, report)
    return write_markdown(report, json_path)
