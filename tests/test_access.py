"""Access (ARCHITECTURE §8): what a user key cannot do, the admin port, per-key rate limits shared through Redis,
the Redis password from a secrets file, CORS.

Real parts: uvicorn on loopback (in threads, and ``unlearn-gateway serve --workers 2`` as a subprocess), a real
redis-server (the session's, and one of our own that the fail-open test kills), the demo model. What
test_admin_api.py already shows (each admin route answers a user key with 403) is not repeated; here a user key
tries real writes and reads and the store is checked afterwards.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import uvicorn

from gateway.app import create_app
from gateway.bench import _load
from gateway.bench._redis import redis_binary, start_redis
from gateway.listeners import bind
from gateway.ratelimit import RedisLimiter
from gateway.settings import Settings
from tests.conftest import Server, free_port, serve, unique_prefix

ADMIN_KEY = "access-admin-key"
USER_KEY = "access-user-key"
OTHER_USER_KEY = "access-other-user-key"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
USER = {"authorization": f"Bearer {USER_KEY}"}
TARGET = {"name": "Carmen Montenegro", "facts": ["She writes historical fiction."], "policy": {"method": "refuse"}}


def envelope(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def keyed(engine, **settings) -> Server:
    config = Settings(api_keys=[USER_KEY, OTHER_USER_KEY], admin_keys=[ADMIN_KEY], **settings)
    return serve(create_app(config, engine=engine), ready_path="/ready")


# -- user keys and the admin API ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gw(demo_engine, redis_url) -> Iterator[Server]:
    server = keyed(demo_engine, store_url=redis_url, store_prefix=unique_prefix())
    yield server
    server.stop()


def test_a_user_key_cannot_write_read_or_dry_run_targets(gw):
    admin = httpx.Client(base_url=gw.url, headers=ADMIN, timeout=30)
    assert admin.post("/admin/targets", json=TARGET | {"name": "Kept Person"}).status_code == 201
    version = admin.get("/admin/version").json()["version"]
    attempts = [("POST", "/admin/targets", TARGET), ("POST", "/admin/targets/import", [TARGET]),
                ("PUT", "/admin/targets/kept-person", TARGET | {"name": "Renamed"}),
                ("PATCH", "/admin/targets/kept-person", {"enabled": False}),
                ("DELETE", "/admin/targets/kept-person", None), ("GET", "/admin/targets", None),
                ("GET", "/admin/targets/kept-person", None), ("GET", "/admin/targets/export", None),
                ("GET", "/admin/targets/kept-person/history", None),
                ("POST", "/admin/classify", {"text": "What does Kept Person write?"})]
    for method, path, body in attempts:
        response = httpx.request(method, gw.url + path, json=body, headers=USER, timeout=30)
        error = envelope(response, 403)
        assert error["type"] == "permission_error", (method, path)
        assert "Kept Person" not in response.text and "kept-person" not in response.text  # nothing leaks back
    # ... and nothing changed: same version, same single target, still enabled
    assert admin.get("/admin/version").json()["version"] == version
    listed = admin.get("/admin/targets").json()
    assert [t["id"] for t in listed["items"]] == ["kept-person"] and listed["items"][0]["enabled"] is True
    admin.close()


@pytest.mark.parametrize("headers, query", [
    ({"x-api-key": USER_KEY}, ""), ({"api-key": USER_KEY}, ""), ({}, f"?api_key={USER_KEY}"),
    ({"authorization": f"Basic {USER_KEY}"}, ""), ({"authorization": f"Bearer {USER_KEY}x"}, ""),
    ({"authorization": f"Bearer {ADMIN_KEY[:-1]}"}, ""), ({"authorization": "Bearer"}, ""),
])
def test_other_ways_of_sending_a_key_do_not_open_the_admin_api(gw, headers, query):
    envelope(httpx.get(gw.url + "/admin/targets" + query, headers=headers, timeout=30), 401)


# -- the admin port ------------------------------------------------------------------------------------------------

def serve_two_ports(app) -> tuple[Server, str, str]:
    """The app on two listening sockets of one uvicorn server (what ``serve`` does with UNLEARN_ADMIN_PORT)."""
    main_socket, admin_socket = bind("127.0.0.1", 0), bind("127.0.0.1", app.state.settings.admin_port)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [main_socket, admin_socket]}, daemon=True)
    thread.start()
    main_url = f"http://127.0.0.1:{main_socket.getsockname()[1]}"
    admin_url = f"http://127.0.0.1:{admin_socket.getsockname()[1]}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    return Server(main_url, app, server, thread), main_url, admin_url


def check_ports_split(main_url: str, admin_url: str) -> None:
    for path in ("/admin/version", "/admin/targets", "/admin/nope"):  # 404 on the main port, even with the key
        error = envelope(httpx.get(main_url + path, headers=ADMIN, timeout=30), 404)
        assert error == {"message": "Not Found", "type": "not_found_error", "param": None, "code": None}
    assert httpx.get(admin_url + "/admin/version", headers=ADMIN, timeout=30).status_code == 200
    envelope(httpx.get(admin_url + "/admin/version", headers=USER, timeout=30), 403)  # keys still apply there
    envelope(httpx.get(admin_url + "/v1/models", headers=USER, timeout=30), 404)
    assert httpx.get(main_url + "/v1/models", headers=USER, timeout=30).status_code == 200
    for url in (main_url, admin_url):
        assert httpx.get(url + "/health", timeout=30).status_code == 200


def test_admin_routes_answer_only_on_the_admin_port(demo_engine, tmp_path):
    settings = Settings(api_keys=[USER_KEY], admin_keys=[ADMIN_KEY], store_path=tmp_path / "t.db",
                        admin_port=free_port())
    server, main_url, admin_url = serve_two_ports(create_app(settings, engine=demo_engine))
    try:
        check_ports_split(main_url, admin_url)
        # A target written on the admin port is served on the main port (one app behind both).
        assert httpx.post(admin_url + "/admin/targets", json=TARGET, headers=ADMIN, timeout=30).status_code == 201
        version = httpx.get(admin_url + "/admin/version", headers=ADMIN, timeout=30).json()["version"]
        deadline = time.monotonic() + 30
        while httpx.get(main_url + "/ready", timeout=30).json()["targets_version"] < version:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        reply = httpx.post(main_url + "/v1/chat/completions", headers=USER, timeout=60, json={
            "model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": "Who is Carmen Montenegro?"}]})
        assert reply.headers["x-unlearn-decision"] == "flagged; policy=refuse"
    finally:
        server.stop()


def test_serve_with_an_admin_port_splits_the_routes_in_every_worker(tmp_path):
    """``unlearn-gateway serve --workers 2`` with UNLEARN_ADMIN_PORT: both sockets in both worker processes."""
    upstream_port, port, admin_port = _load.free_port(), _load.free_port(), _load.free_port()
    started: list[_load.ServerProcess] = []
    try:
        started.append(_load.start_server("upstream", _load.module_command(
            "gateway.bench.synthetic_upstream", "--port", str(upstream_port), "--chunks", "2", "--interval-ms", "1"),
            upstream_port, tmp_path, env=_load.clean_env()))
        env = _load.clean_env(engine="vllm", worker_urls=started[0].url, api_keys=USER_KEY, admin_keys=ADMIN_KEY,
                              admin_port=str(admin_port), store_path=str(tmp_path / "t.db"), log_level="warning")
        started.append(_load.start_server("gateway", _load.cli_command("serve", "--port", str(port), "--workers", "2"),
                                          port, tmp_path, env=env, ready_path="/ready"))
        main_url, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
        pids: set[int] = set()
        deadline = time.monotonic() + 60
        while len(pids) < 2:  # new connections until both workers have answered on each port
            assert time.monotonic() < deadline, f"only workers {pids} answered"
            check_ports_split(main_url, admin_url)
            pids.add(httpx.get(admin_url + "/ready", timeout=30).json()["pid"])
    finally:
        for server in reversed(started):
            server.stop()


def test_admin_port_must_differ_from_the_port():
    with pytest.raises(ValueError, match="admin_port must differ"):
        Settings(port=8000, admin_port=8000)


# -- rate limits ----------------------------------------------------------------------------------------------------

def models(server: Server, headers: dict = USER) -> httpx.Response:
    return httpx.get(server.url + "/v1/models", headers=headers, timeout=30)


def test_two_replicas_share_one_limit_per_key_through_redis(demo_engine, redis_url):
    prefix = unique_prefix()
    replicas = [keyed(demo_engine, store_url=redis_url, store_prefix=prefix, rate_limit_rpm=4) for _ in range(2)]
    try:
        for i in range(4):  # the key's whole allowance, spread over both replicas
            assert models(replicas[i % 2]).status_code == 200
        for replica in replicas:  # ... is spent on both
            response = models(replica)
            error = envelope(response, 429)
            assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
            assert 1 <= int(response.headers["retry-after"]) <= 15  # one request's worth: 60 s / 4
        other = {"authorization": f"Bearer {OTHER_USER_KEY}"}
        assert models(replicas[0], other).status_code == 200  # per key
        assert httpx.get(replicas[1].url + "/admin/version", headers=ADMIN, timeout=30).status_code == 200
        assert httpx.get(replicas[1].url + "/health", timeout=30).status_code == 200
        envelope(httpx.get(replicas[0].url + "/v1/models", headers={"authorization": "Bearer wrong"}), 401)
    finally:
        for replica in replicas:
            replica.stop()


def test_the_embedded_store_limits_in_process(demo_engine, tmp_path):
    server = keyed(demo_engine, store_path=tmp_path / "t.db", rate_limit_rpm=2)
    try:
        assert [models(server).status_code for _ in range(3)] == [200, 200, 429]
        chat = httpx.post(server.url + "/v1/chat/completions", headers=USER, timeout=30, json={
            "model": "demo", "messages": [{"role": "user", "content": "hi"}]})
        envelope(chat, 429)  # every OpenAI route counts
    finally:
        server.stop()


def test_redis_going_down_fails_open_to_the_per_process_limit(demo_engine, caplog):
    """The classifier is the security boundary, not the limiter: Redis dying must not turn requests into errors.
    The gateway keeps serving (its last good target set) and the limit falls back to the process."""
    if redis_binary() is None:
        pytest.skip("redis-server not installed")
    redis = start_redis(password="limiter-test")
    server = keyed(demo_engine, store_url=redis.url, store_prefix=unique_prefix(), rate_limit_rpm=3,
                   store_grace_s=60)
    try:
        assert models(server).status_code == 200  # one of the key's three, counted in Redis
        redis.stop()
        with caplog.at_level(logging.WARNING, logger="gateway.ratelimit"):
            statuses = [models(server).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429], statuses  # a fresh per-process bucket of three
        assert any("Redis unreachable" in r.getMessage() for r in caplog.records)
        reply = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {OTHER_USER_KEY}"},
                           timeout=60, json={"model": "demo", "max_tokens": 2,
                                             "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200, reply.text
    finally:
        server.stop()
        redis.stop()


async def test_redis_limiter_on_a_closed_port_never_raises():
    port = _load.free_port()  # nothing listens here
    limiter = RedisLimiter(f"redis://127.0.0.1:{port}/0", rpm=2, prefix=unique_prefix())
    try:
        started = time.monotonic()
        waits = [await limiter.wait_s("key:x") for _ in range(3)]
        assert waits[:2] == [0.0, 0.0] and 25 < waits[2] <= 30  # per-process GCRA: next slot in 30 s
        assert time.monotonic() - started < 3  # one failed connection, then Redis is skipped for a while
    finally:
        await limiter.aclose()


# -- secrets from files, CORS ---------------------------------------------------------------------------------------

def test_the_redis_password_comes_from_a_secrets_file(demo_engine, redis_url, tmp_path):
    parts = urlsplit(redis_url)
    if not parts.password:
        pytest.skip("the test Redis has no password")
    bare = urlunsplit((parts.scheme, f"{parts.hostname}:{parts.port}", parts.path, "", ""))
    secret = tmp_path / "redis-password"
    secret.write_text(parts.password + "\n")
    server = keyed(demo_engine, store_url=bare, store_password_file=secret, store_prefix=unique_prefix())
    try:
        created = httpx.post(server.url + "/admin/targets", json=TARGET, headers=ADMIN, timeout=30)
        assert created.status_code == 201, created.text
    finally:
        server.stop()
    secret.write_text("not-the-password\n")
    settings = Settings(api_keys=[USER_KEY], admin_keys=[ADMIN_KEY], store_url=bare, store_password_file=secret,
                        store_prefix=unique_prefix())
    server = serve(create_app(settings, engine=demo_engine))  # /health: up, but it cannot read the store
    try:
        assert httpx.get(server.url + "/ready", timeout=30).status_code == 503
        envelope(httpx.post(server.url + "/admin/targets", json=TARGET, headers=ADMIN, timeout=30), 503)
    finally:
        server.stop()


def test_cors_is_off_by_default(gw):
    preflight = httpx.options(gw.url + "/v1/chat/completions", timeout=30, headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    response = models(gw, USER | {"origin": "https://evil.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers


def test_cors_allows_only_the_configured_origins(demo_engine, tmp_path):
    server = keyed(demo_engine, store_path=tmp_path / "t.db", cors_origins=["https://app.example"])
    try:
        preflight = httpx.options(server.url + "/v1/chat/completions", timeout=30, headers={
            "origin": "https://app.example", "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        refused = httpx.options(server.url + "/v1/chat/completions", timeout=30, headers={
            "origin": "https://evil.example", "access-control-request-method": "POST"})
        assert "access-control-allow-origin" not in refused.headers
        response = models(server, USER | {"origin": "https://app.example"})
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-unlearn-targets-version" in response.headers["access-control-expose-headers"]
        denied = models(server, {"origin": "https://app.example"})  # no key: the 401 is readable by the page
        envelope(denied, 401)
        assert denied.headers["access-control-allow-origin"] == "https://app.example"
    finally:
        server.stop()

