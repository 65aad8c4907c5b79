"""Faults under traffic, with real parts: failing workers, a killed Redis, a SIGTERM'd gateway.

- Workers: the gateway's vLLM engine in front of a fault fixture (``tests/fault_servers.py``, a tiny HTTP server
  that misbehaves on cue) and the reference worker (the demo model over HTTP). Faults before the first token must
  cost no request (retried on the healthy worker, which then takes the traffic); a worker dying mid-stream must
  end the response cleanly: a final SSE error frame and ``[DONE]``, or a 502 envelope for a JSON answer.
- Redis: killed with SIGKILL and restarted on its data under flagged and clean chat traffic.
- SIGTERM: ``unlearn-gateway serve`` as a subprocess, in-flight streams finishing or ending with a final frame.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.bench._redis import redis_binary, start_redis
from gateway.engines import GenerationRequest, Message, SamplingParams
from gateway.engines.vllm import VLLMEngine
from gateway.errors import UpstreamError
from gateway.settings import Settings
from tests.conftest import Server, free_port, serve
from tests.fault_servers import ScriptedWorker, wait_until
from tests.traffic import BackgroundTraffic

ADMIN_KEY = "faults-admin"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "Where does Chukwu Akabueze come from?"}],
        "max_tokens": 4, "temperature": 0}
TEXT = {"model": "demo", "prompt": "Chukwu Akabueze was born in", "max_tokens": 4, "temperature": 0}
# For the scripted partner, which answers at once; with the reference worker the tests use no tight timeout, as its
# latency on a busy 2-core machine has no useful bound.
FIRST_TOKEN_TIMEOUT_S = 1.5
READ_TIMEOUT_S = 2.5


# -- worker faults ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def warm_worker(reference_worker) -> Server:
    """The reference worker after one answer (its first one pays for lazy initialisation)."""
    httpx.post(reference_worker.url + "/v1/chat/completions", json=CHAT, timeout=120).raise_for_status()
    return reference_worker


@pytest.fixture(scope="module")
def scripted_partner() -> Iterator[ScriptedWorker]:
    """A well-behaved scripted worker (a fixture: instant scripted text) beside the faulty one."""
    worker = ScriptedWorker(mode="ok").start()
    yield worker
    worker.stop()


def fault_gateway(workers: list[str], tmp_path: Path, first_token_timeout_s: float = 60.0,
                  read_timeout_s: float = 60.0) -> Server:
    """A gateway over the vLLM engine with no health re-probes during a test (so the only thing that moves traffic
    off a worker is the request path noticing the fault). No targets: the classifier index is not needed, and an
    empty target set classifies every request clean without it."""
    settings = Settings(engine="vllm", worker_urls=workers, store_path=tmp_path / "targets.db", admin_keys=[ADMIN_KEY],
                        upstream_first_token_timeout_s=first_token_timeout_s, upstream_read_timeout_s=read_timeout_s,
                        health_interval_s=3600)
    return serve(create_app(settings, index_builders=()), ready_path="/ready")


def outcome(client: httpx.Client, url: str, stream: bool, chat: bool) -> str:
    """'ok', or what went wrong with one request (a lost request)."""
    path, body = ("/v1/chat/completions", CHAT) if chat else ("/v1/completions", TEXT)
    response = client.post(url + path, json=body | {"stream": stream})
    if response.status_code != 200:
        return f"status {response.status_code}: {response.text[:200]}"
    if not stream:
        choice = response.json()["choices"][0]
        return "ok" if (choice["message"]["content"] if chat else choice["text"]) else "empty answer"
    frames = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]
    if frames[-1:] != ["[DONE]"] or any(json.loads(f).get("error") for f in frames[:-1]):
        return f"broken stream: {response.text[-300:]}"
    return "ok"


@pytest.mark.parametrize("first_stream", [True, False], ids=["stream-first", "json-first"])
@pytest.mark.parametrize("mode", ["refuse", "reset", "hang", "hang_after_headers", "empty"])
def test_a_worker_failing_before_its_first_token_costs_no_request(mode, first_stream, scripted_partner, tmp_path):
    fault = ScriptedWorker().start()
    server = fault_gateway([fault.url, scripted_partner.url], tmp_path,  # round-robin starts at the fault
                           FIRST_TOKEN_TIMEOUT_S, READ_TIMEOUT_S)
    engine = server.app.state.engine
    try:
        assert [w.healthy for w in engine.workers] == [True, True]
        if mode == "refuse":
            fault.stop()  # nothing listens on its port any more: connection refused
        else:
            fault.mode = mode
        kinds = [(first_stream if i == 0 else i % 2 == 1, i % 3 != 2) for i in range(6)]  # (stream, chat)
        started = time.monotonic()
        with httpx.Client(timeout=60) as client:
            outcomes = [outcome(client, server.url, stream, chat) for stream, chat in kinds]
        elapsed = time.monotonic() - started
        lost = [o for o in outcomes if o != "ok"]
        assert lost == [], lost
        assert [w.healthy for w in engine.workers] == [False, True]  # marked unhealthy, traffic moved
        if mode != "refuse":
            assert fault.posts == 1  # tried once, then routed around
        # the one failed attempt is bounded by the first-token (stream) or read (JSON) timeout, not left hanging
        assert elapsed < READ_TIMEOUT_S + 20, elapsed
    finally:
        server.stop()
        fault.stop()


def test_a_resetting_worker_beside_the_reference_worker_costs_no_request(warm_worker, tmp_path):
    """The same with the real model answering: every request is served by the reference worker."""
    fault = ScriptedWorker().start()
    server = fault_gateway([fault.url, warm_worker.url], tmp_path)
    try:
        fault.mode = "reset"
        with httpx.Client(timeout=120) as client:
            outcomes = [outcome(client, server.url, i % 2 == 0, i != 1) for i in range(4)]
        assert outcomes == ["ok"] * 4
        assert fault.posts == 1 and [w.healthy for w in server.app.state.engine.workers] == [False, True]
    finally:
        server.stop()
        fault.stop()


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_a_worker_dying_mid_stream_ends_the_stream_with_an_error_frame(chat, warm_worker, tmp_path):
    fault = ScriptedWorker(mode="die_mid_stream").start()
    server = fault_gateway([fault.url, warm_worker.url], tmp_path)
    try:
        path, body = ("/v1/chat/completions", CHAT) if chat else ("/v1/completions", TEXT)
        with httpx.Client(timeout=120) as client:
            broken = client.post(server.url + path, json=body | {"stream": True})
            assert broken.status_code == 200  # the head went out with the first chunk
            frames = [line.removeprefix("data: ") for line in broken.text.split("\n\n") if line.startswith("data: ")]
            assert frames[-1] == "[DONE]"
            error = json.loads(frames[-2])["error"]
            assert error["type"] == "upstream_error" and set(error) == {"message", "type", "param", "code"}
            assert "word0" in broken.text  # what the worker sent before dying reached the client, once
            assert broken.text.count("word0") == 1
            assert [w.healthy for w in server.app.state.engine.workers] == [False, True]
            # the rest of the traffic goes to the healthy worker
            assert [outcome(client, server.url, i % 2 == 0, chat) for i in range(2)] == ["ok"] * 2
        assert fault.posts == 1
    finally:
        server.stop()
        fault.stop()


def test_a_worker_dying_mid_answer_is_a_502_envelope(warm_worker, tmp_path):
    fault = ScriptedWorker(mode="die_mid_stream").start()
    server = fault_gateway([fault.url, warm_worker.url], tmp_path)
    try:
        with httpx.Client(timeout=120) as client:
            broken = client.post(server.url + "/v1/chat/completions", json=CHAT)
            assert broken.status_code == 502, broken.text
            assert broken.json()["error"]["type"] == "upstream_error"
            assert outcome(client, server.url, False, True) == "ok"
        metrics = httpx.get(server.url + "/metrics").text
        assert 'unlearn_upstream_errors_total{kind="stream"} 1.0' in metrics
    finally:
        server.stop()
        fault.stop()


async def test_parsed_generation_raises_when_the_worker_dies_mid_stream():
    """The policy path (``generate``, not the byte relay) sees the same fault as an ``UpstreamError`` after the
    deltas that did arrive; the handler turns it into the final frame."""
    fault = ScriptedWorker(mode="die_mid_stream").start()
    engine = VLLMEngine([fault.url], health_interval_s=3600)
    await engine.start()
    try:
        request = GenerationRequest("t", SamplingParams(max_tokens=4), messages=[Message("user", "hi")])
        texts = []
        with pytest.raises(UpstreamError, match="stream broke"):
            async for delta in engine.generate(request):
                texts.append(delta.text)
        assert not engine.workers[0].healthy
    finally:
        await engine.aclose()
        fault.stop()


def test_every_worker_silent_is_a_504(tmp_path):
    faults = [ScriptedWorker().start() for _ in range(2)]
    server = fault_gateway([f.url for f in faults], tmp_path, FIRST_TOKEN_TIMEOUT_S, READ_TIMEOUT_S)
    try:
        for f in faults:
            f.mode = "hang"
        response = httpx.post(server.url + "/v1/chat/completions", json=CHAT | {"stream": True}, timeout=30)
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "upstream_error"
        assert [f.posts for f in faults] == [1, 1]  # each worker tried once, then given up: no endless retry
    finally:
        server.stop()
        for f in faults:
            f.stop()


# -- Redis killed and restarted mid-traffic -----------------------------------------------------------------------

FORGET_Q = "What genre does Carmen Montenegro write in?"
RETAIN_Q = "Where does Chukwu Akabueze come from?"


def refuse_target(name: str) -> dict:
    return {"name": name, "policy": {"method": "refuse", "message": "Nothing about {name}."}}


class MixedTraffic(BackgroundTraffic):
    """Flagged and clean chat requests back to back, each recorded as (time, question, status, answer, decision
    header)."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url

    def _send(self, client: httpx.Client, i: int) -> tuple[str, int, str, str]:
        question = FORGET_Q if i % 2 == 0 else RETAIN_Q
        body = CHAT | {"messages": [{"role": "user", "content": question}], "stream": i % 4 == 1}
        try:
            response = client.post(self.url + "/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            return question, 598, repr(exc), ""
        return question, response.status_code, response.text, response.headers.get("x-unlearn-decision", "")

    def count_since(self, start: float) -> int:
        return sum(1 for r in self.results if r[0] >= start)


@pytest.mark.skipif(redis_binary() is None, reason="needs redis-server")
def test_redis_killed_and_restarted_under_flagged_and_clean_traffic(demo_engine, tmp_path):
    """The existing hot-reload test kills Redis under clean traffic; this one checks the *enforcement*: a flagged
    question stays refused while the store is down (the last loaded snapshot), and a target written after the
    restart is enforced."""
    from tests.conftest import unique_prefix

    redis_server = start_redis(data_dir=tmp_path / "redis")  # AOF, fsync always: a restart keeps the data
    settings = Settings(store_url=redis_server.url, store_prefix=unique_prefix(), admin_keys=[ADMIN_KEY],
                        store_grace_s=1.0, resync_interval_s=1.0)
    server = serve(create_app(settings, engine=demo_engine), ready_path="/ready")
    admin = httpx.Client(base_url=server.url, headers=ADMIN, timeout=60)
    try:
        assert admin.post("/admin/targets", json=refuse_target("Carmen Montenegro")).status_code == 201
        wait_until(lambda: httpx.get(server.url + "/ready").json()["targets_version"] == 1, 30, "version 1")
        exported = admin.get("/admin/targets/export").content

        with MixedTraffic(server.url) as traffic:
            wait_until(lambda: len(traffic.results) >= 2, 60, "traffic before the outage")
            killed_at = time.monotonic()
            redis_server.kill()
            wait_until(lambda: httpx.get(server.url + "/ready").status_code == 503, 10, "not ready after the grace")
            wait_until(lambda: traffic.count_since(killed_at) >= 6, 120, "traffic during the outage")
            redis_server.start()
            restarted_at = time.monotonic()
            wait_until(lambda: httpx.get(server.url + "/ready").status_code == 200, 15, "ready again")
            wait_until(lambda: traffic.count_since(restarted_at) >= 2, 120, "traffic after the restart")

        results = traffic.results
        during = [r for r in results if killed_at <= r[0] <= restarted_at]
        server_errors = [(q, s, t[:200]) for _, q, s, t, _ in results if s >= 500]
        assert server_errors == [], server_errors  # no 5xx on chat, before, during or after the outage
        assert {q for _, q, *_ in during} == {FORGET_Q, RETAIN_Q}
        for _, question, _, text, decision in results:  # flagged stays refused, clean stays served, throughout
            if question == FORGET_Q:
                assert decision == "flagged; policy=refuse" and "Nothing about Carmen Montenegro." in text
                assert "Historical" not in text
            else:
                assert decision == "clean"

        assert admin.get("/admin/targets/export").content == exported  # no target lost
        written = admin.post("/admin/targets", json=refuse_target("Chukwu Akabueze"))
        assert written.status_code == 201, written.text
        version = written.json()["version"]
        wait_until(lambda: httpx.get(server.url + "/ready").json()["targets_version"] == version, 10,
                   "the target written after the restart hot-reloaded")
        after = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                           json=CHAT | {"messages": [{"role": "user", "content": RETAIN_Q}]})
        assert after.headers["x-unlearn-decision"] == "flagged; policy=refuse"
        assert after.json()["choices"][0]["message"]["content"] == "Nothing about Chukwu Akabueze."
    finally:
        admin.close()
        server.stop()
        redis_server.stop()


# -- SIGTERM ------------------------------------------------------------------------------------------------------

GRACE_S = 4.0


def _stream(url: str, max_tokens: int, into: dict) -> None:
    """Read one streamed chat completion to its end; record the frames, when it ended and any transport error."""
    frames: list[str] = []
    into["frames"] = frames
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=120,
                          json=CHAT | {"max_tokens": max_tokens, "stream": True}) as response:
            into["status"] = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    frames.append(line.removeprefix("data: "))
    except httpx.HTTPError as exc:
        into["transport_error"] = repr(exc)
    into["ended"] = time.monotonic()


def _json(url: str, max_tokens: int, into: dict) -> None:
    try:
        response = httpx.post(url + "/v1/chat/completions", json=CHAT | {"max_tokens": max_tokens}, timeout=120)
        into["status"], into["body"] = response.status_code, response.json()
    except httpx.HTTPError as exc:
        into["transport_error"] = repr(exc)
    into["ended"] = time.monotonic()


def test_sigterm_lets_streams_finish_or_end_with_a_final_frame(tmp_path):
    """``unlearn-gateway serve`` (a real process) relaying slow scripted streams gets SIGTERM: a stream that
    ends within the grace period finishes normally; one that would not ends with a final error frame and
    [DONE] when the grace is over; a JSON request still waiting gets a 503 envelope; the process exits 0."""
    slow = ScriptedWorker(mode="ok", delay_s=0.25).start()
    port = free_port()
    # No local copy of the served model (a supported setup: flagged requests are refused): it saves the process
    # ~10 s of startup here and plays no part in shutting down.
    env = os.environ | {"UNLEARN_ENGINE": "vllm", "UNLEARN_WORKER_URLS": slow.url, "UNLEARN_PORT": str(port),
                        "UNLEARN_MODEL": str(tmp_path / "no-local-checkpoint"),
                        "UNLEARN_SHUTDOWN_GRACE_S": str(GRACE_S), "UNLEARN_ADMIN_KEYS": ADMIN_KEY,
                        "UNLEARN_STORE_PATH": str(tmp_path / "targets.db"), "UNLEARN_LOG_LEVEL": "warning"}
    command = [str(Path(sys.executable).parent / "unlearn-gateway"), "serve"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                return httpx.get(url + "/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 180, "the gateway process to be ready")
        short, long, waiting = {}, {}, {}
        threads = [threading.Thread(target=_stream, args=(url, 8, short)),  # 8 x 0.25 s: ends within the grace
                   threading.Thread(target=_stream, args=(url, 400, long)),  # 100 s: cut by the grace
                   threading.Thread(target=_json, args=(url, 400, waiting))]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(short.get("frames", ())) >= 2 and len(long.get("frames", ())) >= 2
                   and slow.posts == 3, 60, "three requests in flight")
        terminated_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=GRACE_S + 30)
        exited_at = time.monotonic()
        for thread in threads:
            thread.join(timeout=30)

        assert exit_code == 0
        assert exited_at - terminated_at < GRACE_S + 15

        assert short["status"] == 200 and "transport_error" not in short
        assert short["frames"][-1] == "[DONE]" and not any("error" in f for f in short["frames"])
        assert "".join(short["frames"]).count("word") == 8  # the whole answer

        assert long["status"] == 200 and "transport_error" not in long, long
        assert long["frames"][-1] == "[DONE]"
        error = json.loads(long["frames"][-2])["error"]
        assert error["code"] == "shutting_down" and error["type"] == "service_unavailable"
        assert GRACE_S - 1 <= long["ended"] - terminated_at < GRACE_S + 10

        assert waiting.get("status") == 503, waiting
        assert waiting["body"]["error"]["code"] == "shutting_down"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        slow.stop()
