"""Two ``unlearn-gateway serve --workers 2`` processes on one Redis: a target written through either is served by
all four worker processes. One gateway runs without admin keys: its supervisor generates one key, prints it once,
and both of its workers accept it.

The gateways' engine is the synthetic upstream (vLLM protocol over HTTP); the engine plays no part in reloading,
and four worker processes each loading a model would only slow this test down.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.bench import _load
from tests.conftest import unique_prefix

ADMIN_KEY = "multiprocess-admin-key"
WORKERS = 2


def poll_pids(url: str, *, path: str = "/ready", headers: dict | None = None, until_version: int = 0,
              timeout_s: float = 60.0) -> dict[int, dict]:
    """Ask with a new connection each time (any worker may accept it) until ``WORKERS`` distinct pids have
    answered with at least ``until_version``; return each pid's answer."""
    answers: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(answers) < WORKERS:
        assert time.monotonic() < deadline, f"{url}: only pids {sorted(answers)} answered in time"
        response = httpx.get(url + path, headers=headers or {}, timeout=5)
        if path == "/ready" and response.status_code == 503 and not response.json()["targets"]["loaded"]:
            time.sleep(0.05)  # the server waited for one worker; another may still be loading its targets
            continue
        assert response.status_code == 200, response.text
        body = response.json()
        version = body.get("targets_version", body.get("active_version"))
        if version >= until_version:
            answers.setdefault(body["pid"], body)
    return answers


def last_swap(answers_by_gateway: dict[str, dict[int, dict]]) -> float:
    return max(a["targets"]["loaded_at"] for answers in answers_by_gateway.values() for a in answers.values())


@pytest.fixture(scope="module")
def fleet(redis_url) -> Iterator[tuple[list[_load.ServerProcess], str]]:
    with tempfile.TemporaryDirectory(prefix="multiprocess-") as tmp:
        log_dir = Path(tmp)
        started: list[_load.ServerProcess] = []
        try:
            upstream_port = _load.free_port()
            upstream = _load.start_server("upstream", _load.module_command(
                "gateway.bench.synthetic_upstream", "--port", str(upstream_port), "--chunks", "4",
                "--interval-ms", "1"), upstream_port, log_dir, env=_load.clean_env())
            started.append(upstream)
            common = {"store_url": redis_url, "store_prefix": unique_prefix(), "engine": "vllm",
                      "worker_urls": upstream.url, "api_keys": "mp-user", "log_level": "warning"}
            for name, extra in (("gateway-a", {"admin_keys": ADMIN_KEY}), ("gateway-b", {})):
                port = _load.free_port()
                started.append(_load.start_server(
                    name, _load.cli_command("serve", "--port", str(port), "--workers", str(WORKERS)), port, log_dir,
                    env=_load.clean_env(**common, **extra), ready_path="/ready"))
            generated = re.findall(r"ug-admin-[A-Za-z0-9_-]+", started[2].log_path.read_text())
            assert len(generated) == 1, "the generated admin key must be printed exactly once"
            yield started[1:], generated[0]
        finally:
            for server in reversed(started):
                server.stop()


def test_a_write_through_one_gateway_reaches_all_four_workers(fleet):
    (first, second), generated_key = fleet
    before = {url: poll_pids(url) for url in (first.url, second.url)}
    pids = {pid for answers in before.values() for pid in answers}
    assert len(pids) == 2 * WORKERS

    written = httpx.post(first.url + "/admin/targets", json={"name": "Matthew Perry"},
                         headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    returned = time.time()
    after = {url: poll_pids(url, until_version=written["version"]) for url in (first.url, second.url)}
    assert {pid for answers in after.values() for pid in answers} == pids
    # Each worker reports when it swapped the version in (wall clock, shared by all processes on this host):
    # that, not how long our polling took to reach every worker, is the propagation time.
    assert last_swap(after) - returned < 2.0
    assert all(a["targets"]["count"] == 1 for answers in after.values() for a in answers.values())

    # the second gateway's generated admin key works on both of its workers, and writes propagate back
    second_admin = {"authorization": f"Bearer {generated_key}"}
    assert len(poll_pids(second.url, path="/admin/version", headers=second_admin)) == WORKERS
    assert httpx.get(first.url + "/admin/version", headers=second_admin).status_code == 401  # not the other's key
    patched = httpx.patch(second.url + "/admin/targets/matthew-perry", json={"enabled": False},
                          headers=second_admin).json()
    assert patched["version"] == written["version"] + 1
    returned = time.time()
    after = {url: poll_pids(url, until_version=patched["version"]) for url in (first.url, second.url)}
    assert last_swap(after) - returned < 2.0

    chat = httpx.post(second.url + "/v1/chat/completions", headers={"authorization": "Bearer mp-user"},
                      json={"model": "synthetic", "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert chat.headers["x-unlearn-targets-version"] == str(patched["version"])
    history = httpx.get(first.url + "/admin/targets/matthew-perry/history",
                        headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["entries"]
    assert len({entry["actor"] for entry in history}) == 2  # two different admin keys, by id
