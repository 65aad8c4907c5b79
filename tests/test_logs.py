"""The logs of a real ``unlearn-gateway serve`` never contain prompt or completion text, unless
``UNLEARN_LOG_CONTENT=true`` says so; every request has one JSON access line carrying its request id.

The gateway runs the local engine with the demo model (the real generation path), at the default log level.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.bench import _load

CHAT = "/v1/chat/completions"


def start_gateway(tmp_path: Path, **settings: str) -> _load.ServerProcess:
    port = _load.free_port()
    env = _load.clean_env(store_path=str(tmp_path / "targets.db"), log_level="info", **settings)
    return _load.start_server(f"gateway-{secrets.token_hex(3)}", _load.cli_command("serve", "--port", str(port)),
                              port, tmp_path, env=env, ready_path="/ready", timeout_s=180)


def traffic(url: str, marker: str) -> list[httpx.Response]:
    """A plain, a streamed and a rejected chat request, each with the marker in its prompt."""
    prompt = f"Tell me about {marker}. Where is Chukwu Akabueze from?"
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0}
    plain = httpx.post(url + CHAT, json=body, headers={"x-request-id": "plain-1"}, timeout=60)
    with httpx.stream("POST", url + CHAT, json=body | {"stream": True}, timeout=60) as streamed:
        streamed.read()
    rejected = httpx.post(url + CHAT, json=body | {"temperature": f"hot {marker}"}, timeout=60)
    assert (plain.status_code, streamed.status_code, rejected.status_code) == (200, 200, 400)
    return [plain, streamed, rejected]


def json_lines(server: _load.ServerProcess) -> list[dict]:
    lines = []
    for line in server.log_path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[_load.ServerProcess]:
    server = start_gateway(tmp_path)
    yield server
    server.stop()


def test_logs_hold_no_prompt_or_completion_text(gateway: _load.ServerProcess):
    marker = f"zq{secrets.token_hex(8)}marker"
    responses = traffic(gateway.url, marker)
    completion = responses[0].json()["choices"][0]["message"]["content"]
    gateway.stop()  # flush everything
    text = gateway.log_path.read_text()
    assert marker not in text
    if len(completion.strip()) >= 16:  # long enough not to occur in a log line by chance
        assert completion not in text
    access = [line for line in json_lines(gateway) if line["logger"] == "unlearn.access"]
    # A slow start answers the fixture's readiness polls with 503, and failed probes are logged too.
    assert {line["route"] for line in access if line["route"] != CHAT} <= {"/ready"}
    access = [line for line in access if line["route"] == CHAT]
    assert len(access) == 3
    ids = {line["request_id"] for line in access}
    assert ids == {r.headers["x-request-id"] for r in responses} and "plain-1" in ids
    assert {line["status"] for line in access} == {200, 400}
    # Served requests were classified (unflagged: no targets); the invalid one never reached the classifier.
    assert {(line["status"], line["decision"]) for line in access} == {(200, "unflagged"), (400, "none")}
    assert all("request_body" not in line and "response_body" not in line for line in access)
    streamed = next(line for line in access if line["stream"])
    assert streamed["ttft_ms"] is not None and streamed["overhead_ms"] is not None


def test_log_content_true_logs_prompts_and_completions(tmp_path: Path):
    server = start_gateway(tmp_path, log_content="true")
    try:
        marker = f"zq{secrets.token_hex(8)}marker"
        responses = traffic(server.url, marker)
    finally:
        server.stop()
    lines = json_lines(server)
    assert any("UNLEARN_LOG_CONTENT is on" in line["msg"] for line in lines)  # said loudly at startup
    plain = next(line for line in lines if line.get("request_id") == "plain-1")
    assert marker in plain["request_body"]
    assert responses[0].json()["choices"][0]["message"]["content"] in json.loads(plain["response_body"])[
        "choices"][0]["message"]["content"]
