"""``unlearn-gateway bench http-client``: httpx vs aiohttp as the client of a streaming relay.

The choice of upstream client decides how much of the gateway's CPU goes to relaying tokens. To compare the
two libraries and nothing else, two identical raw-ASGI relay fixtures (``gateway.bench.relays``, one uvicorn
worker each) sit in front of the same synthetic upstream, and one load generator streams through each of them
and straight to the upstream, in interleaved rounds of one run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import gateway
from gateway.bench import _load
from gateway.bench._load import ServerProcess, Target, progress
from gateway.bench.relays import CLIENT_KINDS
from gateway.bench.synthetic_upstream import MODEL_ID

DEFAULT_LEVELS = (16, 64)
SYNTHETIC_CHUNKS = 32
SYNTHETIC_INTERVAL_MS = 10.0
_CHAT = "/v1/chat/completions"


def _start_servers(stack: ExitStack, log_dir: Path) -> dict[str, ServerProcess]:
    """The synthetic upstream and one relay per client library; each stops when ``stack`` closes."""
    port = _load.free_port()
    upstream = _load.start_server(
        "synthetic", _load.module_command("gateway.bench.synthetic_upstream", "--port", str(port), "--chunks",
                                          str(SYNTHETIC_CHUNKS), "--interval-ms", str(SYNTHETIC_INTERVAL_MS)),
        port, log_dir, env=_load.clean_env(), timeout_s=60)
    stack.callback(upstream.stop)
    servers = {"direct": upstream}
    for kind in CLIENT_KINDS:
        port = _load.free_port()
        relay = _load.start_server(
            f"relay-{kind}", _load.module_command("gateway.bench.relays", "--client", kind, "--upstream",
                                                  upstream.url, "--port", str(port)),
            port, log_dir, env=_load.clean_env(), timeout_s=60)
        stack.callback(relay.stop)
        servers[kind] = relay
    return servers


def _cell(concurrency: int, tallies: dict[str, _load.Tally]) -> dict[str, Any]:
    direct = tallies["direct"].summary()
    cell: dict[str, Any] = {"concurrency": concurrency, "direct": direct}
    for kind in CLIENT_KINDS:
        summary = tallies[kind].summary()
        cell[kind] = summary | _load.compare(direct, summary)
    cell["errors"] = sum(cell[name]["errors"] for name in ("direct", *CLIENT_KINDS))
    return cell


async def _measure(urls: dict[str, str], levels: Sequence[int], duration_s: float) -> dict[str, Any]:
    targets = [Target(name, url + _CHAT) for name, url in urls.items()]
    body = _load.request_body({"model": MODEL_ID, "messages": [{"role": "user", "content": "Say something."}],
                               "stream": True})
    rounds = _load.rounds_for(duration_s)
    cells: dict[str, Any] = {}
    async with _load.client_session() as session:
        progress(f"warming up at {max(levels)} streams")
        await _load.warm_up(session, targets, body, max(levels), min(1.0, duration_s))
        for level in levels:
            progress(f"{level} streams, {rounds} rounds x {duration_s / rounds:.2f} s per path")
            cell = _cell(level, await _load.measure_interleaved(session, targets, body, level, duration_s, rounds))
            progress(f"c{level}: direct {cell['direct']['requests_per_s']:.1f} req/s, " + ", ".join(
                f"{kind} {cell[kind]['requests_per_s']:.1f} (ratio {cell[kind]['throughput_ratio']})"
                for kind in CLIENT_KINDS) + f", errors {cell['errors']}")
            cells[f"c{level}"] = cell
    return cells


def _verdict(cells: dict[str, Any], deciding_level: int) -> dict[str, Any]:
    """The winner is the client that relays more requests/s at the highest concurrency measured."""
    cell = cells[f"c{deciding_level}"]
    rates = {kind: cell[kind]["requests_per_s"] for kind in CLIENT_KINDS}
    winner, loser = sorted(CLIENT_KINDS, key=lambda kind: rates[kind], reverse=True)
    verdict: dict[str, Any] = {"winner": winner, "winner_decided_at": f"c{deciding_level}",
                               "winner_throughput_advantage": round(rates[winner] / rates[loser], 4)
                               if rates[loser] else None}
    for level_key, level_cell in cells.items():
        for kind in CLIENT_KINDS:
            verdict[f"throughput_ratio_{level_key}_{kind}"] = level_cell[kind]["throughput_ratio"]
            verdict[f"added_latency_p50_ms_{level_key}_{kind}"] = level_cell[kind]["added_latency_p50_ms"]
    return verdict


def run_http_client_bench(duration_s: float = 8.0, levels: Sequence[int] = DEFAULT_LEVELS) -> dict[str, Any]:
    """Run the benchmark and return its report (``duration_s``: seconds of load per path and level)."""
    levels = tuple(levels)
    config: dict[str, Any] = {
        "duration_s_per_path_and_level": duration_s, "levels": list(levels),
        "paths": {"direct": "load generator -> synthetic upstream",
                  **{kind: f"load generator -> {kind} relay (gateway.bench.relays, 1 uvicorn worker) -> "
                           "synthetic upstream" for kind in CLIENT_KINDS}},
        "upstream": {"fixture": "gateway.bench.synthetic_upstream", "chunks": SYNTHETIC_CHUNKS,
                     "interval_ms": SYNTHETIC_INTERVAL_MS},
        "load_generator": f"aiohttp streaming clients, closed loop, {_load.client_loop_name()} event loop",
        "throughput": _load.THROUGHPUT_DEFINITION,
        "interleaving": "per level, rounds cycle direct/httpx/aiohttp, reversing order every round",
        "rounds_per_level": _load.rounds_for(duration_s), "machine": _load.machine(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-http-client-") as tmp, ExitStack() as stack:
        progress("starting the synthetic upstream and the httpx and aiohttp relays")
        servers = _start_servers(stack, Path(tmp))
        cells = _load.run_async(_measure({name: s.url for name, s in servers.items()}, levels, duration_s))
    config["machine"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    metrics = cells | _verdict(cells, max(levels))
    return {"bench": "http-client", "metrics": metrics, "config": config, "version": gateway.__version__}
