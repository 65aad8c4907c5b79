"""Shared fixtures: real servers on loopback (uvicorn in background threads) around real models."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from gateway.app import create_app
from gateway.bench._redis import redis_binary, start_redis
from gateway.engines.local import LocalEngine
from gateway.settings import Settings
from gateway.worker import create_worker_app

# The model every test serves under the id "demo"; another checkpoint can be tried with UNLEARN_TEST_MODEL.
TEST_MODEL = os.environ.get("UNLEARN_TEST_MODEL", "demo")
DATA_DIR = Path(os.environ.get("UNLEARN_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    app: object
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(app, ready_path: str = "/health") -> Server:
    """Run an ASGI app with uvicorn on a free loopback port in a thread; return once it answers."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(url + ready_path, timeout=1).status_code == 200:
                return Server(url, app, server, thread)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server on {url} did not start")


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of a server's /metrics, summed over the label sets that match ``labels`` (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@pytest.fixture(scope="session", autouse=True)
def _embedded_store_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Gateways built from plain ``Settings()`` (and ``serve`` subprocesses, which inherit the environment) keep
    their embedded target store and ULD assistants in a temporary folder, never in the user's ~/.local/share, and
    train no ULD assistant in the background unless a test asks for it (``uld_auto_train=True``): a test that
    imports ULD targets for another purpose should not start trainings."""
    overrides = {"UNLEARN_STORE_PATH": str(tmp_path_factory.mktemp("embedded-store") / "targets.db"),
                 "UNLEARN_ADAPTERS_DIR": str(tmp_path_factory.mktemp("adapters")),
                 "UNLEARN_ULD_AUTO_TRAIN": "false"}
    previous = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A password-protected redis-server of our own for the session (or the one at ``UNLEARN_TEST_REDIS_URL``).
    Tests share it by working under their own key prefix."""
    if url := os.environ.get("UNLEARN_TEST_REDIS_URL"):
        yield url
        return
    if redis_binary() is None:
        pytest.skip("redis-server not installed and UNLEARN_TEST_REDIS_URL not set")
    server = start_redis(password=secrets.token_hex(8))
    yield server.url
    server.stop()


def unique_prefix() -> str:
    return f"test-{secrets.token_hex(6)}:"


@pytest.fixture(scope="session")
def demo_engine() -> LocalEngine:
    return LocalEngine(TEST_MODEL, served_model_name="demo")


@pytest.fixture(scope="session")
def classifier_encoder():
    """One loaded sentence encoder for tests that start many gateways: pass it to their index builders
    (``classifiers.index.IndexBuilder(encoder)``) instead of loading it again per gateway."""
    from classifiers.encoder import load_encoder

    return load_encoder()


@pytest.fixture(scope="session")
def local_gateway(demo_engine) -> Iterator[Server]:
    server = serve(create_app(Settings(), engine=demo_engine))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def reference_worker() -> Iterator[Server]:
    server = serve(create_worker_app(LocalEngine(TEST_MODEL, served_model_name="demo")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def retain_worker() -> Iterator[Server]:
    """A second reference worker serving the ``demo-retain`` twin (a lock-step partner for ULD over HTTP)."""
    server = serve(create_worker_app(LocalEngine("demo-retain", served_model_name="demo-retain")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vllm_gateway(reference_worker) -> Iterator[Server]:
    settings = Settings(engine="vllm", worker_urls=[reference_worker.url])
    server = serve(create_app(settings))
    yield server
    server.stop()


@pytest.fixture(params=["local", "vllm"])
def gateway(request) -> Server:
    """The gateway over each engine: local in process, and vLLM engine -> reference worker over HTTP."""
    return request.getfixturevalue(f"{request.param}_gateway")
