"""``unlearn-gateway bench reload``: how fast a target change reaches every gateway worker.

Setup: our own ``redis-server`` on a free port, ``gateways`` x ``unlearn-gateway serve --workers N`` on it (each
worker a separate process with its own reloader), and the synthetic upstream as their engine (the engine plays
no part in reloading; a light one leaves the CPUs to the gateways).

Measured:

- **propagation** of single-target writes (create, patch, delete in turn, sent to the gateways in turn): from the
  moment the admin write *returned* to the moment the *last* worker swapped the new version in. Every worker
  reports, in ``/ready``, its pid, its version and the wall-clock time it swapped that version in
  (``targets.loaded_at``); all processes share this host's clock, so the difference is exact and does not depend
  on how often we poll. A worker that swapped before the write's response reached us counts as 0. The poll time
  at which we had *seen* every worker at the new version is reported too (an upper bound, including the poll).
- **bulk import**: a ``import_size``-target JSONL import through one gateway; the time from sending it until the
  last worker serves it (the import's own validation and write included).

Workers cannot be addressed one by one behind a shared port, so the poller opens a new connection per request
and the kernel hands it to whichever worker accepts; after enough polls every pid has answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

import gateway
from gateway.bench import _load
from gateway.bench._load import percentile, progress
from gateway.bench._redis import start_redis

GOAL_PROPAGATION_P99_MS = 100.0
GOAL_IMPORT_VISIBLE_S = 60.0
ADMIN_KEY = "bench-reload-admin-key"
WAIT_S = 30.0  # per change: longer means the worker missed it (a failure, counted)
IMPORT_WAIT_S = 300.0
LOG_LEVEL = "warning"


@dataclass
class Fleet:
    """The gateways' base URLs and, once discovered, every worker pid behind each."""

    urls: list[str]
    workers_per_gateway: int
    pids: dict[int, set[int]] = field(default_factory=dict)

    @property
    def all_pids(self) -> set[int]:
        return set().union(*self.pids.values()) if self.pids else set()


def _session() -> aiohttp.ClientSession:
    # force_close: a new connection per request, so each poll may land on any worker of a gateway.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30, sock_connect=5))


async def _ready(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(url + "/ready") as response:
            return await response.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def discover(session: aiohttp.ClientSession, fleet: Fleet, timeout_s: float = 60.0) -> None:
    """Poll until every gateway has shown ``workers_per_gateway`` distinct pids."""
    deadline = time.monotonic() + timeout_s
    for index, url in enumerate(fleet.urls):
        seen: set[int] = set()
        while len(seen) < fleet.workers_per_gateway:
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway {url}: saw only {len(seen)} of {fleet.workers_per_gateway} workers")
            answers = await asyncio.gather(*(_ready(session, url) for _ in range(4)))
            seen.update(a["pid"] for a in answers if a and "pid" in a)
        fleet.pids[index] = seen


async def wait_everywhere(session: aiohttp.ClientSession, fleet: Fleet, version: int,
                          timeout_s: float) -> tuple[dict[int, float], float] | None:
    """Poll every gateway until each known worker reports ``version`` or newer.

    Returns each worker's swap time (``loaded_at``, wall clock) and the wall-clock time we had seen them all;
    None on timeout."""
    loaded_at: dict[int, float] = {}
    wanted = fleet.all_pids
    deadline = time.monotonic() + timeout_s

    async def poll(url: str, pids: set[int]) -> None:
        while not pids <= loaded_at.keys():
            if time.monotonic() > deadline:
                return
            answer = await _ready(session, url)
            if answer and answer.get("targets_version", -1) >= version and answer["pid"] in pids:
                loaded_at.setdefault(answer["pid"], answer["targets"]["loaded_at"])
            else:
                await asyncio.sleep(0.001)

    await asyncio.gather(*(poll(url, fleet.pids[i]) for i, url in enumerate(fleet.urls) for _ in range(2)))
    if not wanted <= loaded_at.keys():
        return None
    return loaded_at, time.time()


async def _admin(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {ADMIN_KEY}", **kwargs.pop("headers", {})}
    async with session.request(method, url, headers=headers, **kwargs) as response:
        body = await response.json()
        if response.status >= 300:
            raise RuntimeError(f"{method} {url}: HTTP {response.status}: {body}")
        return body


def _change(i: int) -> tuple[str, str, dict[str, Any] | None]:
    """Create, patch, delete in turn (one target per three changes)."""
    target_id = f"bench-target-{i // 3:05d}"
    step = i % 3
    if step == 0:
        return "POST", "/admin/targets", {"id": target_id, "name": f"Bench Target {i // 3}",
                                          "aliases": [f"BT{i // 3}"], "facts": ["A fact to forget."]}
    if step == 1:
        return "PATCH", f"/admin/targets/{target_id}", {"description": f"changed by write {i}"}
    return "DELETE", f"/admin/targets/{target_id}", None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


async def measure_changes(fleet: Fleet, changes: int) -> dict[str, Any]:
    propagation: list[float] = []
    observed: list[float] = []
    writes: list[float] = []
    failures: list[str] = []
    async with _session() as session:
        await discover(session, fleet)
        progress(f"workers: {sorted(fleet.all_pids)}")
        for i in range(changes):
            method, path, body = _change(i)
            url = fleet.urls[i % len(fleet.urls)]
            started, started_wall = time.perf_counter(), time.time()
            written = await _admin(session, method, url + path, json=body)
            returned_wall = started_wall + (time.perf_counter() - started)
            writes.append(time.perf_counter() - started)
            seen = await wait_everywhere(session, fleet, written["version"], WAIT_S)
            if seen is None:
                failures.append(f"version {written['version']} not on every worker within {WAIT_S:.0f} s")
                continue
            loaded_at, seen_wall = seen
            propagation.append(max(0.0, max(loaded_at.values()) - returned_wall))
            observed.append(seen_wall - returned_wall)
            if (i + 1) % 50 == 0:
                progress(f"{i + 1}/{changes} changes: propagation p50 {_ms(percentile(propagation, 50))} ms, "
                         f"p99 {_ms(percentile(propagation, 99))} ms")
    return {
        "changes": changes,
        "propagated": len(propagation),
        "failures": len(failures),
        "failure_examples": failures[:3],
        "propagation_p50_ms": _ms(percentile(propagation, 50)),
        "propagation_p99_ms": _ms(percentile(propagation, 99)),
        "propagation_max_ms": _ms(max(propagation, default=None)),
        "observed_p50_ms": _ms(percentile(observed, 50)),
        "observed_p99_ms": _ms(percentile(observed, 99)),
        "write_latency_p50_ms": _ms(percentile(writes, 50)),
        "write_latency_p99_ms": _ms(percentile(writes, 99)),
        "workers": len(fleet.all_pids),
    }


def import_document(size: int) -> bytes:
    lines = (json.dumps({"name": f"Bulk Person {i:06d}", "aliases": [f"BP{i}", f"Person number {i}"],
                         "description": f"A synthetic person for the reload benchmark, number {i}.",
                         "facts": [f"Bulk Person {i:06d} was born in {1900 + i % 120}.",
                                   f"Bulk Person {i:06d} lives in city {i % 500}."],
                         "policy": {"method": ("eco", "guard", "refuse")[i % 3]}})
             for i in range(size))
    return ("\n".join(lines) + "\n").encode()


async def measure_import(fleet: Fleet, size: int) -> dict[str, Any]:
    body = import_document(size)
    async with _session() as session:
        if not fleet.pids:
            await discover(session, fleet)
        started_wall, started = time.time(), time.perf_counter()
        result = await _admin(session, "POST", fleet.urls[0] + "/admin/targets/import?mode=upsert", data=body,
                              headers={"content-type": "application/x-ndjson"})
        request_s = time.perf_counter() - started
        seen = await wait_everywhere(session, fleet, result["version"], IMPORT_WAIT_S)
    if seen is None:
        return {"import_targets": size, "import_request_s": round(request_s, 3), "import_visible_s": None,
                "import_error": f"not on every worker within {IMPORT_WAIT_S:.0f} s"}
    loaded_at, seen_wall = seen
    return {"import_targets": size, "import_bytes": len(body), "import_request_s": round(request_s, 3),
            "import_visible_s": round(max(loaded_at.values()) - started_wall, 3),
            "import_observed_s": round(seen_wall - started_wall, 3)}


def run_reload_bench(changes: int = 200, import_size: int = 10_000, gateways: int = 2, workers: int = 2,
                     resync_interval_s: float = 30.0) -> dict[str, Any]:
    """Run the benchmark and return its report."""
    if changes < 1 or gateways < 1 or workers < 1:
        raise ValueError("changes, gateways and workers must be >= 1")
    config: dict[str, Any] = {
        "gateways": gateways, "workers_per_gateway": workers, "changes": changes, "import_size": import_size,
        "gateway_command": "unlearn-gateway serve --port P --workers N",
        "store": "redis-server on loopback (no persistence), one per run",
        "engine": "vllm engine -> gateway.bench.synthetic_upstream (not involved in reloading)",
        "index_builders": "none installed yet: the classifier issue adds its index build (embeddings) to the reload",
        "resync_interval_s": resync_interval_s,
        "change_mix": "create, patch, delete in turn; sent to the gateways in turn",
        "propagation": "last worker's swap time (its /ready targets.loaded_at, wall clock) minus the time the "
                       "admin write returned; 0 if already swapped",
        "machine": _load.machine(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-reload-") as tmp, ExitStack() as stack:
        log_dir = Path(tmp)
        redis_server = start_redis()
        stack.callback(redis_server.stop)
        upstream_port = _load.free_port()
        upstream = _load.start_server(
            "upstream", _load.module_command("gateway.bench.synthetic_upstream", "--port", str(upstream_port)),
            upstream_port, log_dir, env=_load.clean_env())
        stack.callback(upstream.stop)
        env = _load.clean_env(store_url=redis_server.url, admin_keys=ADMIN_KEY, engine="vllm",
                              worker_urls=upstream.url, log_level=LOG_LEVEL, resync_interval_s=str(resync_interval_s))
        urls = []
        for g in range(gateways):
            port = _load.free_port()
            progress(f"starting gateway {g} ({workers} workers) on port {port}")
            server = _load.start_server(f"gateway-{g}", _load.cli_command("serve", "--port", str(port), "--workers",
                                                                          str(workers)),
                                        port, log_dir, env=env, ready_path="/ready")
            stack.callback(server.stop)
            urls.append(server.url)
        fleet = Fleet(urls, workers)
        metrics = _load.run_async(measure_changes(fleet, changes))
        if import_size:
            progress(f"importing {import_size:,} targets")
            metrics |= _load.run_async(measure_import(fleet, import_size))
            progress(f"import visible on every worker after {metrics.get('import_visible_s')} s")
    metrics |= _goals(metrics)
    config["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    return {"bench": "reload", "metrics": metrics, "config": config, "version": gateway.__version__}


def _goals(metrics: dict[str, Any]) -> dict[str, Any]:
    goals: dict[str, Any] = {"goal_propagation_p99_ms": GOAL_PROPAGATION_P99_MS,
                             "goal_import_visible_s": GOAL_IMPORT_VISIBLE_S,
                             "anchors": {"litellm_poll_s": 30, "kong_poll_s": 5}}
    p99 = metrics.get("propagation_p99_ms")
    goals["meets_goal_propagation_p99"] = (p99 is not None and metrics["failures"] == 0
                                           and p99 <= GOAL_PROPAGATION_P99_MS)
    if "import_targets" in metrics:
        visible = metrics.get("import_visible_s")
        goals["meets_goal_import_visible"] = visible is not None and visible <= GOAL_IMPORT_VISIBLE_S
    return goals

