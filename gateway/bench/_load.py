"""What the benchmarks share: free ports, server subprocesses, a streaming load generator and its statistics.

Every benchmark compares several paths to one upstream (direct, through the gateway, through a relay). Measuring
them all with exactly this code, in interleaved rounds within one run, is what makes the ratios meaningful on a
noisy machine: a burst of background load hits every path alike instead of one whole cell.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

T = TypeVar("T")

_JSON_HEADERS = {"content-type": "application/json"}
DECISION_HEADER = "x-unlearn-decision"
_ERROR_EXAMPLES = 3
THROUGHPUT_DEFINITION = ("requests_per_s: successful requests per second of measurement window, each counted by "
                         "the share of its duration inside the window (closed loop: about concurrency / mean "
                         "latency); latencies include requests that finished after the window closed")


# -- progress --------------------------------------------------------------------------------------------------
def progress(message: str) -> None:
    """Benchmarks run for minutes; say what is happening on stderr (stdout carries the report)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- processes -------------------------------------------------------------------------------------------------
def free_port() -> int:
    """A port that is free now; the small race until the server binds it is acceptable on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def module_command(module: str, *args: str) -> list[str]:
    """Run a module with this interpreter, so subprocesses use the same environment as the benchmark."""
    return [sys.executable, "-m", module, *args]


def cli_command(*args: str) -> list[str]:
    """``unlearn-gateway <args>`` through this interpreter (no reliance on the script being on PATH)."""
    return [sys.executable, "-c", "from gateway.cli import main; main()", *args]


def clean_env(**settings: str) -> dict[str, str]:
    """This environment minus every ``UNLEARN_*`` variable, plus ``settings`` (``engine="vllm"`` ->
    ``UNLEARN_ENGINE=vllm``): a stray config file or API key in the caller's shell must not change what is measured.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNLEARN_")}
    env.update({f"UNLEARN_{name.upper()}": value for name, value in settings.items()})
    return env


@dataclass
class ServerProcess:
    """A server the benchmark started, in its own process group so that its workers go down with it."""

    name: str
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the group (uvicorn's supervisor and its workers), then SIGKILL whatever is left of it."""
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def start_server(name: str, command: list[str], port: int, log_dir: Path, *, env: Mapping[str, str] | None = None,
                 ready_path: str = "/health", timeout_s: float = 120.0) -> ServerProcess:
    """Start ``command`` (which must listen on ``port``) and return once ``ready_path`` answers 200.

    The caller owns the result and must ``stop()`` it; on failure it is stopped here and the error carries
    the end of its log.
    """
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, env=dict(env) if env is not None else None, stdout=log_file,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    server = ServerProcess(name, f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before it was ready:\n{server.log_tail()}")
        if _http_status(server.url + ready_path) == 200:
            return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} was not ready within {timeout_s:.0f} s:\n{server.log_tail()}")


def first_model_id(base_url: str) -> str:
    """The first model an OpenAI-compatible server lists: the id requests must name."""
    with urllib.request.urlopen(base_url + "/v1/models", timeout=10) as response:
        return json.load(response)["data"][0]["id"]


# -- load ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One path to the upstream: a name for the report and the chat-completions URL to load."""

    name: str
    url: str


@dataclass(frozen=True)
class Sample:
    """One request: when it started (``perf_counter``), total latency, time to its first content token
    (streams only), why it failed (if it did) and the gateway's ``x-unlearn-decision`` header (if any)."""

    started_s: float
    latency_s: float
    ttft_s: float | None
    error: str | None = None
    decision: str | None = None


class _StreamWatch:
    """Follows an SSE stream just far enough to time the first content token and to see how it ended.

    Events are JSON-parsed only until the first content arrives; after that a byte comparison per event
    suffices, which keeps the load generator's own CPU cost low and the same for every path.
    """

    def __init__(self) -> None:
        self._pending = b""
        self.first_content = False
        self.done = False
        self.error: str | None = None

    def feed(self, chunk: bytes) -> bool:
        """Take the next bytes; True when they completed the first event with content."""
        *events, self._pending = (self._pending + chunk).split(b"\n\n")
        first = False
        for event in events:  # every event must be seen, even after the first content ([DONE] may follow)
            first = self._see(event.strip()) or first
        return first

    def _see(self, event: bytes) -> bool:
        if event == b"data: [DONE]":
            self.done = True
            return False
        if b'"error"' in event:
            self.error = self.error or event[:300].decode(errors="replace")
            return False
        if self.first_content or not event.startswith(b"data:"):
            return False
        try:
            message = json.loads(event[5:])
        except ValueError:
            self.error = self.error or f"unparsable event: {event[:100]!r}"
            return False
        for choice in message.get("choices") or ():
            if (choice.get("delta") or {}).get("content") or choice.get("text"):
                self.first_content = True
                return True
        return False


async def stream_once(session: aiohttp.ClientSession, url: str, body: bytes) -> Sample:
    """Send one streaming request and time it; any failure becomes a ``Sample`` with an error, never an exception."""
    start = time.perf_counter()
    ttft: float | None = None
    decision: str | None = None
    watch = _StreamWatch()
    try:
        async with session.post(url, data=body, headers=_JSON_HEADERS) as response:
            decision = response.headers.get(DECISION_HEADER)
            if response.status != 200:
                detail = (await response.read())[:200].decode(errors="replace")
                return Sample(start, time.perf_counter() - start, None, f"HTTP {response.status}: {detail}",
                              decision)
            async for chunk in response.content.iter_any():
                if watch.feed(chunk) and ttft is None:
                    ttft = time.perf_counter() - start
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Sample(start, time.perf_counter() - start, None, f"{type(exc).__name__}: {exc}", decision)
    latency = time.perf_counter() - start
    if watch.error:
        return Sample(start, latency, ttft, watch.error, decision)
    if not watch.done:
        return Sample(start, latency, ttft, "stream ended without data: [DONE]", decision)
    if ttft is None:
        return Sample(start, latency, None, "stream carried no content", decision)
    return Sample(start, latency, ttft, None, decision)


async def complete_once(session: aiohttp.ClientSession, url: str, body: bytes) -> Sample:
    """Send one non-streaming request and time it (no TTFT); failures become a ``Sample`` with an error."""
    start = time.perf_counter()
    decision: str | None = None
    try:
        async with session.post(url, data=body, headers=_JSON_HEADERS) as response:
            decision = response.headers.get(DECISION_HEADER)
            raw = await response.read()
            status = response.status
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Sample(start, time.perf_counter() - start, None, f"{type(exc).__name__}: {exc}", decision)
    latency = time.perf_counter() - start
    if status != 200:
        return Sample(start, latency, None, f"HTTP {status}: {raw[:200].decode(errors='replace')}", decision)
    try:
        choices = json.loads(raw).get("choices") or ()
    except (ValueError, AttributeError):
        return Sample(start, latency, None, f"unparsable body: {raw[:100]!r}", decision)
    if not any((c.get("message") or {}).get("content") or c.get("text") for c in choices):
        return Sample(start, latency, None, "answer carried no content", decision)
    return Sample(start, latency, None, None, decision)


def error_kind(error: str) -> str:
    """A short, countable name for a ``Sample.error`` message (the reports count errors by kind)."""
    if error.startswith("HTTP "):
        return f"http_{error[5:8]}"
    if error.startswith(("TimeoutError", "ServerTimeoutError", "SocketTimeoutError", "ConnectionTimeoutError")):
        return "timeout"
    if error.startswith(("Client", "ServerDisconnected", "ServerConnection")):
        return "connection"
    if error.startswith("stream ended"):
        return "stream_incomplete"
    if error.startswith(("stream carried no content", "answer carried no content")):
        return "empty_answer"
    if error.startswith("unparsable"):
        return "protocol"
    if error.startswith("unfinished"):
        return "unfinished"
    return "error_event"


@dataclass(frozen=True)
class Round:
    """One round against one target: its samples, its window, and the successful work done inside the window."""

    samples: list[Sample]
    window_s: float
    completed_in_window: float


def _share_in_window(sample: Sample, end: float) -> float:
    """The fraction of a successful request's duration that lies before ``end`` (it started inside the window)."""
    if sample.error is not None or sample.latency_s <= 0:
        return 0.0
    return max(0.0, min(sample.started_s + sample.latency_s, end) - sample.started_s) / sample.latency_s


async def run_round(session: aiohttp.ClientSession, url: str, body: bytes, concurrency: int,
                    duration_s: float) -> Round:
    """Closed loop: ``concurrency`` clients each send request after request until the window closes.

    Requests still running at the close finish (their latencies count; cutting them off would favour short
    ones), but throughput counts each successful request only by the share of its duration inside the window.
    Counting whole requests over the round's wall time instead would be quantised by how many requests fit in
    a round: at 330 ms a request, one more or one fewer per client moves a 1-s round by a quarter, and which
    it is flips on a few milliseconds of latency. The fractional count is steady: it tends to concurrency over
    mean latency, the throughput of a closed loop.
    """
    samples: list[Sample] = []
    start = time.perf_counter()
    deadline = start + duration_s

    async def client() -> None:
        while time.perf_counter() < deadline:
            samples.append(await stream_once(session, url, body))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Round(samples, duration_s, sum(_share_in_window(s, deadline) for s in samples))


@dataclass(frozen=True)
class Sent:
    """One request of an open-loop run: its place in the schedule, when it was due (``perf_counter``), how late
    the load generator sent it (a late generator would hide the server's queueing) and what came back."""

    index: int
    due_s: float
    send_lag_s: float
    sample: Sample


@dataclass(frozen=True)
class OpenLoopRun:
    """What an open-loop run sent, and the requests it could not account for (both count as errors)."""

    sent: list[Sent]
    start_s: float
    window_s: float
    dropped: int  # due but not sent: ``max_in_flight`` requests were still running
    unfinished: int  # still running when the drain time ran out, then cancelled


async def open_loop(rate_per_s: float, duration_s: float, send: Callable[[int], Awaitable[Sample]], *,
                    max_in_flight: int = 2048, drain_s: float = 60.0) -> OpenLoopRun:
    """Open loop: request ``i`` is due ``i / rate_per_s`` after the start whether or not earlier ones finished.

    Unlike ``run_round``'s closed loop, a slow server does not slow the arrivals down, so queueing shows in the
    latencies, as it would with independent clients. The run is bounded: after the window, requests still
    running get ``drain_s`` to finish and are then cancelled and counted as unfinished.
    """
    if rate_per_s <= 0 or duration_s <= 0:
        raise ValueError("rate_per_s and duration_s must be positive")
    sent: list[Sent] = []
    running: set[asyncio.Task[None]] = set()
    dropped = 0

    async def one(index: int, due: float) -> None:
        lag = time.perf_counter() - due
        sent.append(Sent(index, due, lag, await send(index)))

    start = time.perf_counter()
    for index in range(max(1, int(rate_per_s * duration_s))):
        due = start + index / rate_per_s
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(running) >= max_in_flight:
            dropped += 1
            continue
        task = asyncio.create_task(one(index, due))
        running.add(task)
        task.add_done_callback(running.discard)
    await asyncio.sleep(max(0.0, start + duration_s - time.perf_counter()))
    unfinished = 0
    if running:
        _, pending = await asyncio.wait(set(running), timeout=drain_s)
        unfinished = len(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return OpenLoopRun(sorted(sent, key=lambda s: s.index), start, duration_s, dropped, unfinished)


def tree_usage(pid: int) -> tuple[int, float] | None:
    """Resident memory (bytes) and CPU seconds of a process and all its descendants (uvicorn's workers);
    None once the process is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    rss, cpu = 0, 0.0
    for process in processes:
        try:
            with process.oneshot():
                rss += process.memory_info().rss
                times = process.cpu_times()
                cpu += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss, cpu


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between order statistics; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


@dataclass
class Tally:
    """What one target accumulated over its rounds."""

    samples: list[Sample] = field(default_factory=list)
    window_s: float = 0.0
    completed_in_window: float = 0.0
    rounds: int = 0

    def add(self, round_: Round) -> None:
        self.samples += round_.samples
        self.window_s += round_.window_s
        self.completed_in_window += round_.completed_in_window
        self.rounds += 1

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.error is None]
        failed = [s.error for s in self.samples if s.error is not None]
        latencies = [s.latency_s for s in ok]
        ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
        result: dict[str, Any] = {
            "requests": len(ok),
            "errors": len(failed),
            "measured_s": round(self.window_s, 3),
            "rounds": self.rounds,
            "requests_per_s": round(self.completed_in_window / self.window_s, 3) if self.window_s else 0.0,
            "latency_p50_ms": _ms(percentile(latencies, 50)),
            "latency_p99_ms": _ms(percentile(latencies, 99)),
            "ttft_p50_ms": _ms(percentile(ttfts, 50)),
            "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        }
        if failed:
            result["error_examples"] = list(dict.fromkeys(failed))[:_ERROR_EXAMPLES]
        return result


def window_tally(samples: Sequence[Sample], start_s: float, window_s: float) -> Tally:
    """A ``Tally`` of requests that started in a window, with throughput counted as in ``run_round``."""
    end = start_s + window_s
    return Tally(list(samples), window_s, sum(_share_in_window(s, end) for s in samples), 1)


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 2)


def compare(base: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, float | None]:
    """How ``other`` (e.g. via the gateway) fares against ``base`` (direct): throughput ratio, added latency."""
    ratio = other["requests_per_s"] / base["requests_per_s"] if base["requests_per_s"] else None
    return {
        "throughput_ratio": None if ratio is None else round(ratio, 4),
        "added_latency_p50_ms": _difference(base["latency_p50_ms"], other["latency_p50_ms"]),
        "added_latency_p99_ms": _difference(base["latency_p99_ms"], other["latency_p99_ms"]),
        "added_ttft_p50_ms": _difference(base["ttft_p50_ms"], other["ttft_p50_ms"]),
        "added_ttft_p99_ms": _difference(base["ttft_p99_ms"], other["ttft_p99_ms"]),
    }


def rounds_for(duration_s: float, min_round_s: float = 1.0, max_rounds: int = 8) -> int:
    """How many interleaved rounds a cell of ``duration_s`` per target is cut into: more rounds spread noise
    more evenly, but each must stay long enough to reach a steady state (at least two rounds, for ABBA order).
    """
    return max(2, min(max_rounds, int(duration_s / min_round_s)))


async def measure_interleaved(session: aiohttp.ClientSession, targets: Sequence[Target], body: bytes,
                              concurrency: int, duration_s: float, rounds: int) -> dict[str, Tally]:
    """Give each target ``duration_s`` of load at ``concurrency``, cut into rounds that alternate between targets.

    The order reverses every round (A B, B A, A B ...), so a drift in background load affects every target
    about equally instead of favouring whichever ran first.
    """
    tallies = {target.name: Tally() for target in targets}
    for r in range(rounds):
        order = targets if r % 2 == 0 else list(reversed(targets))
        for target in order:
            tallies[target.name].add(await run_round(session, target.url, body, concurrency, duration_s / rounds))
    return tallies


async def warm_up(session: aiohttp.ClientSession, targets: Sequence[Target], body: bytes, concurrency: int,
                  duration_s: float) -> None:
    """Open connections and warm every server's code paths; fail fast if a target cannot serve at all."""
    for target in targets:
        samples = (await run_round(session, target.url, body, concurrency, duration_s)).samples
        failed = [s.error for s in samples if s.error is not None]
        if len(failed) == len(samples):
            raise RuntimeError(f"warm-up: every request to {target.name} ({target.url}) failed, e.g. {failed[0]}")
        if failed:
            progress(f"warm-up: {len(failed)}/{len(samples)} requests to {target.name} failed, e.g. {failed[0]}")


def client_session(timeout_s: float = 600.0) -> aiohttp.ClientSession:
    """The load generator's client: unbounded keep-alive pool (concurrency is set by the clients, not the pool);
    ``timeout_s`` bounds each request."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    return aiohttp.ClientSession(connector=connector,
                                 timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=10))


def request_body(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def run_async(work: Awaitable[T]) -> T:
    """Run the load generator on uvloop where available: a faster client leaves more CPU to the servers."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.run(work)  # type: ignore[arg-type]
    return uvloop.run(work)  # type: ignore[arg-type]


def client_loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover
        return "asyncio"
    return "uvloop"


def machine() -> dict[str, Any]:
    """Enough about the machine to read the figures: CPUs and how busy it already was."""
    return {
        "cpus": os.cpu_count(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
