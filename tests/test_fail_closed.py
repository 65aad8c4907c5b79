"""Fail closed: a request that cannot be classified is answered 503 or with the refusal, never unguarded.

Real parts: the demo model (local engine), the classifier with the real sentence encoder, the embedded target
store, uvicorn on loopback. Faults are injected through ``create_app(index_builders=...)``: the real classifier
index builder over ``FaultyEncoder`` (a fault fixture: the real encoder with a switch that makes it raise or
stall), no classifier index at all, or a builder that always raises (the targets never load).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence

import httpx
import numpy as np
import pytest

from classifiers.index import IndexBuilder as ClassifierIndexBuilder
from gateway.app import create_app
from gateway.settings import Settings
from policies.refuse import refusal
from tests.conftest import Server, metric, serve
from tests.fault_servers import wait_until

ADMIN = {"authorization": "Bearer fail-closed-admin"}
FORGET_Q = "What genre does Carmen Montenegro write in?"
RETAIN_Q = "Where does Chukwu Akabueze come from?"
# Shares the target's words without naming it, so only the encoder can decide it (a name alone needs no encoder).
UNNAMED_Q = "Who writes historical fiction?"
TARGET = {"name": "Carmen Montenegro", "facts": ["Carmen Montenegro writes historical fiction."],
          "policy": {"method": "refuse", "message": "Nothing about {name}."}}
GENERIC_REFUSAL = refusal([])  # the target-agnostic refusal: names no one
TIMEOUT_S = 0.5


class FaultyEncoder:
    """Fault fixture: the real sentence encoder behind a switch. ``mode``: "ok", "raise" (every call raises) or
    "stall" (blocks until ``release`` is set, far past the classification timeout)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.mode = "ok"
        self.release = threading.Event()
        self.calls = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        if self.mode == "raise":
            raise RuntimeError("encoder fault (injected)")
        if self.mode == "stall":
            self.release.wait(60)
        return self.inner.encode(texts)


class RaisingBuilder:
    """Fault fixture: an index builder that always raises, so the worker never loads a target set."""

    name = "classifier"

    def build(self, targets, previous):
        raise RuntimeError("index build fault (injected)")


@pytest.fixture(scope="module")
def encoder():
    from classifiers import load_encoder

    return load_encoder()


def gateway(demo_engine, tmp_path, fail_mode: str, builders, ready_path: str = "/ready") -> Server:
    settings = Settings(admin_keys=["fail-closed-admin"], store_path=tmp_path / "targets.db", fail_mode=fail_mode,
                        classify_timeout_s=TIMEOUT_S)
    return serve(create_app(settings, engine=demo_engine, index_builders=builders), ready_path=ready_path)


def add_target(server: Server) -> None:
    created = httpx.post(server.url + "/admin/targets", json=TARGET, headers=ADMIN, timeout=60)
    assert created.status_code == 201, created.text
    version = created.json()["version"]
    wait_until(lambda: httpx.get(server.url + "/ready").json()["targets_version"] >= version, 60, "target loaded")


def ask(server: Server, question: str, stream: bool = False) -> httpx.Response:
    body = {"model": "demo", "messages": [{"role": "user", "content": question}], "max_tokens": 4,
            "temperature": 0, "stream": stream}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)


def answer_text(response: httpx.Response) -> str:
    if response.headers["content-type"].startswith("text/event-stream"):
        frames = [f.removeprefix("data: ") for f in response.text.split("\n\n") if f.startswith("data: ")]
        assert frames[-1] == "[DONE]"
        return "".join(json.loads(f)["choices"][0]["delta"].get("content", "") for f in frames[:-1]
                       if json.loads(f)["choices"])
    return response.json()["choices"][0]["message"]["content"]


def assert_failed_closed(response: httpx.Response, fail_mode: str, reason: str) -> None:
    if fail_mode == "error":
        assert response.status_code == 503, response.text
        assert response.json() == {"error": {"message": response.json()["error"]["message"],
                                             "type": "service_unavailable", "param": None, "code": reason}}
        if reason == "targets_not_loaded":
            assert response.headers["retry-after"]
    else:
        assert response.status_code == 200, response.text
        assert response.headers["x-unlearn-decision"] == "unclassified; policy=refuse"
        assert answer_text(response) == GENERIC_REFUSAL


@pytest.fixture(params=["error", "refuse"])
def fail_mode(request) -> str:
    return request.param


@pytest.fixture
def faulty_gateway(demo_engine, tmp_path, fail_mode, encoder) -> Iterator[tuple[Server, FaultyEncoder]]:
    faulty = FaultyEncoder(encoder)
    server = gateway(demo_engine, tmp_path, fail_mode, (ClassifierIndexBuilder(encoder=faulty),))
    add_target(server)
    yield server, faulty
    faulty.release.set()
    server.stop()


def test_encoder_errors_and_timeouts_fail_closed_and_are_counted_apart(faulty_gateway, fail_mode):
    server, faulty = faulty_gateway
    # Working classifier: an intentional intervention (the target's own refusal), counted as flagged.
    flagged = ask(server, FORGET_Q)
    assert flagged.headers["x-unlearn-decision"] == "flagged; policy=refuse"
    assert answer_text(flagged) == "Nothing about Carmen Montenegro."

    faulty.mode = "raise"
    for stream in (False, True):
        calls = faulty.calls
        assert_failed_closed(ask(server, UNNAMED_Q, stream), fail_mode, "classifier_error")
        assert faulty.calls > calls  # the fault was met, not skipped

    faulty.mode = "stall"
    started = time.monotonic()
    assert_failed_closed(ask(server, UNNAMED_Q), fail_mode, "classifier_timeout")
    assert time.monotonic() - started < 30  # the stalled encoder is not waited for (it blocks for 60 s)
    faulty.release.set()
    faulty.mode = "ok"

    # Back to normal: the same question is flagged again, and clean questions are answered.
    assert answer_text(ask(server, FORGET_Q)) == "Nothing about Carmen Montenegro."
    clean = ask(server, RETAIN_Q)
    assert clean.status_code == 200 and clean.headers["x-unlearn-decision"] == "clean"

    assert metric(server, "unlearn_fail_closed_total", reason="classifier_error") == 2
    assert metric(server, "unlearn_fail_closed_total", reason="classifier_timeout") == 1
    assert metric(server, "unlearn_requests_total", decision="fail_closed") == 3
    assert metric(server, "unlearn_requests_total", decision="flagged", policy="refuse") == 2  # interventions only
    status = "503" if fail_mode == "error" else "200"
    assert metric(server, "unlearn_requests_total", decision="fail_closed", status=status) == 3


def test_targets_without_a_classifier_index_fail_closed(demo_engine, tmp_path, fail_mode):
    server = gateway(demo_engine, tmp_path, fail_mode, ())  # loads targets, builds no classifier index
    try:
        assert ask(server, RETAIN_Q).headers["x-unlearn-decision"] == "clean"  # no targets: nothing to classify
        add_target(server)
        for question in (FORGET_Q, RETAIN_Q):  # with targets, nothing can be told apart: both fail closed
            assert_failed_closed(ask(server, question), fail_mode, "classifier_index_missing")
        assert metric(server, "unlearn_fail_closed_total", reason="classifier_index_missing") == 2
    finally:
        server.stop()


def test_a_worker_that_never_loaded_its_targets_fails_closed(demo_engine, tmp_path, fail_mode):
    server = gateway(demo_engine, tmp_path, fail_mode, (RaisingBuilder(),), ready_path="/health")
    try:
        assert httpx.get(server.url + "/ready").json()["targets"]["loaded"] is False
        for question, stream in ((FORGET_Q, False), (RETAIN_Q, False), (RETAIN_Q, True)):
            assert_failed_closed(ask(server, question, stream), fail_mode, "targets_not_loaded")
        assert metric(server, "unlearn_fail_closed_total", reason="targets_not_loaded") == 3
    finally:
        server.stop()
