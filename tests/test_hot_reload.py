"""Hot reload: a write through one gateway reaches another on the same Redis; the version shows in the header,
``/ready`` and ``/metrics``; Redis dying under chat traffic costs no chat request; restarts reload everything.

Gateways here are in-process apps (uvicorn on loopback, the demo model); ``test_multiprocess.py`` does the same
across ``serve --workers 2`` processes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.bench._load import free_port
from gateway.bench._redis import RedisServer, redis_binary, start_redis
from gateway.registry import Target, open_store
from gateway.registry.reload import ActiveTargets, TargetReloader
from tests.conftest import Server, unique_prefix
from tests.test_admin_api import ADMIN, USER_KEY, make_gateway
from tests.traffic import BackgroundTraffic

USER = {"authorization": f"Bearer {USER_KEY}"}
CHAT = {"messages": [{"role": "user", "content": "Where is Chukwu Akabueze from?"}], "max_tokens": 4,
        "temperature": 0}


def ready(server: Server) -> httpx.Response:
    return httpx.get(server.url + "/ready", timeout=10)


# Functional bound only: the 2 s propagation goal is measured by `unlearn-gateway bench reload`, not here, because
# a shared CI machine under load can take longer to rebuild the classifier index.
RELOAD_TIMEOUT_S = 15.0


def wait_for(check, timeout_s: float, what: str) -> float:
    """Poll ``check`` until true; return the seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"{what}: not within {timeout_s} s")
        time.sleep(0.01)
    return time.monotonic() - started


def versions_on(server: Server) -> int:
    return ready(server).json()["targets_version"]


@pytest.fixture
def pair(demo_engine, redis_url):
    prefix = unique_prefix()
    first = make_gateway(demo_engine, redis_url, prefix)
    second = make_gateway(demo_engine, redis_url, prefix)
    yield first, second
    first.stop()
    second.stop()


def test_a_write_through_one_gateway_reaches_another(pair):
    first, second = pair
    written = httpx.post(first.url + "/admin/targets", json={"name": "Matthew Perry"}, headers=ADMIN).json()
    assert written["version"] == 1
    wait_for(lambda: versions_on(second) == 1, RELOAD_TIMEOUT_S, "version 1 on the second gateway")
    status = ready(second).json()
    assert status["ready"] is True and status["targets"]["count"] == 1 and status["targets"]["store_ok"] is True

    assert httpx.get(second.url + "/v1/models", headers=USER).headers["x-unlearn-targets-version"] == "1"
    chat = httpx.post(second.url + "/v1/chat/completions", json=CHAT, headers=USER, timeout=60)
    assert chat.status_code == 200 and chat.headers["x-unlearn-targets-version"] == "1"
    with httpx.stream("POST", second.url + "/v1/chat/completions", json=CHAT | {"stream": True}, headers=USER,
                      timeout=60) as streamed:
        assert streamed.headers["x-unlearn-targets-version"] == "1"
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert b"data: [DONE]" in streamed.read()
    bad = httpx.post(second.url + "/v1/chat/completions", json={"messages": []}, headers=USER)
    assert bad.status_code == 400 and bad.headers["x-unlearn-targets-version"] == "1"

    httpx.patch(second.url + "/admin/targets/matthew-perry", json={"enabled": False}, headers=ADMIN)
    wait_for(lambda: versions_on(first) == 2, RELOAD_TIMEOUT_S, "version 2 on the first gateway")
    metrics = httpx.get(first.url + "/metrics").text
    assert 'unlearn_targets_version{pid="' in metrics and "} 2.0" in metrics.split("unlearn_targets_version{")[1]
    assert "unlearn_target_store_up" in metrics


# -- the reloader itself, on the embedded store ------------------------------------------------------------------

class RecordingBuilder:
    """An index builder that records what it was given and the thread it ran on."""

    name = "recording"

    def __init__(self, fail_when: int | None = None):
        self.calls: list[tuple[list[str], Any, int]] = []
        self.fail_when = fail_when

    def build(self, targets: Sequence[Target], previous: Any | None) -> Any:
        if self.fail_when is not None and len(targets) == self.fail_when:
            raise RuntimeError("builder broke")
        self.calls.append(([t.id for t in targets], previous, threading.get_ident()))
        return {"ids": frozenset(t.id for t in targets)}


async def test_reloader_builds_indexes_off_the_loop_and_swaps_whole_snapshots(tmp_path: Path):
    store = open_store("", tmp_path / "targets.db")
    writer = open_store("", tmp_path / "targets.db")  # another process's view of the same file
    builder = RecordingBuilder(fail_when=3)
    reloader = TargetReloader(store, [builder], resync_interval_s=0.2, grace_s=5)
    try:
        await reloader.start()
        first = reloader.current
        assert first.loaded and first.version == 0 and first.indexes["recording"] == {"ids": frozenset()}

        await writer.import_targets([{"name": "Alpha"}, {"name": "Beta"}], "test")
        assert await reloader.wait_for_version(1, RELOAD_TIMEOUT_S)
        pinned = reloader.current
        assert [t.id for t in pinned.targets] == ["alpha", "beta"] and set(pinned.by_id) == {"alpha", "beta"}
        assert pinned.indexes["recording"] == {"ids": frozenset({"alpha", "beta"})}
        assert builder.calls[-1][1] == first.indexes["recording"]  # given the previous index
        assert builder.calls[-1][2] != threading.get_ident()  # built in a worker thread
        with pytest.raises(AttributeError):
            pinned.version = 5  # type: ignore[misc]
        with pytest.raises(TypeError):
            pinned.by_id["gamma"] = pinned.targets[0]  # type: ignore[index]

        await writer.create(Target(name="Gamma"), "test")  # 3 targets: the builder fails
        await asyncio.sleep(0.6)
        assert reloader.current is pinned and reloader.stats.load_failures >= 1  # old set kept, never dropped
        assert "builder broke" in reloader.stats.last_error
        await writer.create(Target(name="Delta"), "test")
        assert await reloader.wait_for_version(3, 3.0)
        assert len(reloader.current.targets) == 4 and reloader.stats.last_error is None
        assert [t.id for t in pinned.targets] == ["alpha", "beta"]  # a request holding the old one is unaffected
    finally:
        await reloader.aclose()
        await store.aclose()
        await writer.aclose()


async def test_placeholder_is_not_loaded():
    empty = ActiveTargets.placeholder()
    assert not empty.loaded and empty.version == 0 and empty.targets == ()


# -- faults -------------------------------------------------------------------------------------------------------

class ChatTraffic(BackgroundTraffic):
    """Chat requests (plain and streamed) in a loop against several gateways, recording (time, status, targets
    version) of each."""

    def __init__(self, servers: Sequence[Server]):
        super().__init__(headers=USER, timeout_s=60)
        self.servers = servers

    def _send(self, client: httpx.Client, i: int) -> tuple[int, str]:
        server = self.servers[i % len(self.servers)]
        stream = i % 2 == 1
        try:
            response = client.post(server.url + "/v1/chat/completions", json=CHAT | {"stream": stream})
        except httpx.HTTPError:
            return 598, ""
        if stream and b"data: [DONE]" not in response.content:
            return 599, response.headers.get("x-unlearn-targets-version", "")
        return response.status_code, response.headers.get("x-unlearn-targets-version", "")

    def between(self, start: float, end: float) -> list[tuple[float, int, str]]:
        return [r for r in self.results if start <= r[0] <= end]


@pytest.mark.skipif(redis_binary() is None, reason="needs redis-server")
def test_redis_killed_under_chat_traffic(demo_engine, tmp_path):
    redis_server = start_redis(data_dir=tmp_path / "redis")  # persistent: a restart keeps the data
    prefix = unique_prefix()
    gateways = [make_gateway(demo_engine, redis_server.url, prefix, store_grace_s=1.0, resync_interval_s=1.0)
                for _ in range(2)]
    try:
        first, second = gateways
        targets = [{"name": f"Person {i}", "facts": [f"Fact {i}."]} for i in range(50)]
        assert httpx.post(first.url + "/admin/targets/import", json=targets, headers=ADMIN).json()["version"] == 1
        wait_for(lambda: all(versions_on(g) == 1 for g in gateways), RELOAD_TIMEOUT_S, "version 1 everywhere")
        exported = httpx.get(first.url + "/admin/targets/export", headers=ADMIN).content

        with ChatTraffic(gateways) as traffic:
            wait_for(lambda: len(traffic.results) >= 2, 30, "chat traffic")
            killed_at = time.monotonic()
            redis_server.kill()

            write = httpx.post(second.url + "/admin/targets", json={"name": "Lost"}, headers=ADMIN, timeout=30)
            assert write.status_code == 503, write.text
            assert write.json()["error"]["code"] == "store_unavailable"
            assert httpx.get(first.url + "/admin/targets", headers=ADMIN, timeout=30).status_code == 503
            wait_for(lambda: all(ready(g).status_code == 503 for g in gateways), 6.0, "not ready after the grace")
            for g in gateways:
                status = ready(g).json()
                assert status["targets"]["store_ok"] is False
                assert status["targets_version"] == 1 and status["targets"]["count"] == 50  # last good set kept
                assert httpx.get(g.url + "/v1/models", headers=USER).headers["x-unlearn-targets-version"] == "1"
            wait_for(lambda: len(traffic.between(killed_at, time.monotonic())) >= 4, 60, "chat during the outage")

            redis_server.start()
            restarted_at = time.monotonic()
            wait_for(lambda: all(ready(g).status_code == 200 for g in gateways), 10.0, "ready again")
            wait_for(lambda: len(traffic.between(restarted_at, time.monotonic())) >= 2, 60, "chat after")

        during = traffic.between(killed_at, restarted_at)
        assert len(during) >= 4
        assert all(status == 200 for _, status, _ in traffic.results), \
            sorted({status for _, status, _ in traffic.results})
        assert {version for _, _, version in during} == {"1"}

        # targets intact, and the workers follow new writes again (notifications resubscribed)
        assert httpx.get(second.url + "/admin/targets/export", headers=ADMIN).content == exported
        written = httpx.post(second.url + "/admin/targets", json={"name": "After Restart"}, headers=ADMIN).json()
        assert written["version"] == 2
        wait_for(lambda: all(versions_on(g) == 2 for g in gateways), RELOAD_TIMEOUT_S,
                 "version 2 everywhere after restart")
    finally:
        for g in gateways:
            g.stop()
        redis_server.stop()


def test_a_restarted_gateway_reloads_every_target(demo_engine, redis_url):
    prefix = unique_prefix()
    first = make_gateway(demo_engine, redis_url, prefix)
    try:
        targets = [{"name": f"Author {i}", "aliases": [f"A{i}"]} for i in range(1_000)]
        httpx.post(first.url + "/admin/targets/import", json=targets, headers=ADMIN, timeout=60)
        httpx.delete(first.url + "/admin/targets/author-7", headers=ADMIN)
        exported = httpx.get(first.url + "/admin/targets/export", headers=ADMIN).content
    finally:
        first.stop()
    restarted = make_gateway(demo_engine, redis_url, prefix)
    try:
        status = ready(restarted).json()  # make_gateway returns once /ready is 200: loaded at startup
        assert status["ready"] and status["targets_version"] == 2 and status["targets"]["count"] == 999
        assert httpx.get(restarted.url + "/admin/targets/export", headers=ADMIN).content == exported
    finally:
        restarted.stop()


@pytest.mark.skipif(redis_binary() is None, reason="needs redis-server")
def test_fail_closed_until_the_first_load(demo_engine, tmp_path):
    """A gateway whose store is down at startup serves no generation until it has loaded the targets once."""
    port = free_port()
    redis_server = RedisServer(redis_binary(), port, None, tmp_path / "redis")
    from gateway.app import create_app
    from gateway.settings import Settings
    from tests.conftest import serve

    settings = Settings(admin_keys=["a"], api_keys=[USER_KEY], store_url=redis_server.url, store_grace_s=0.5)
    server = serve(create_app(settings, engine=demo_engine))  # /health: it starts, but is not ready
    try:
        assert ready(server).status_code == 503 and ready(server).json()["targets"]["loaded"] is False
        refused = httpx.post(server.url + "/v1/chat/completions", json=CHAT, headers=USER)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "targets_not_loaded"
        redis_server.start()
        wait_for(lambda: ready(server).status_code == 200, 10.0, "ready once the store answers")
        assert httpx.post(server.url + "/v1/chat/completions", json=CHAT, headers=USER, timeout=60).status_code == 200
    finally:
        server.stop()
        redis_server.stop()
