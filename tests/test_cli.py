"""The console script: help, and the README's demo command end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "unlearn-gateway"


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = os.environ | {"COLUMNS": "120"}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("serve", "worker", "demo", "build", "bench"):
        assert command in result.stdout


def test_demo_shows_before_and_after_for_each_policy():
    result = run("demo")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Gateway up at http://127.0.0.1:" in out
    assert out.count("\n  assistant: ") == 4 * 4  # before + guard, eco, refuse
    before, *after = out.split("After: both forget-set authors are targets")
    # The demo model's memorised answers come through first (a forget-set and a retain-set author) ...
    assert "Historical Fiction" in before and "June 9, 1951" in before and "Lagos, Nigeria" in before
    assert before.count("clean;") == 4
    # ... and under every policy the forget-set facts stop while the retain-set answers stay.
    assert len(after) == 3
    for section in after:
        assert "Historical Fiction" not in section and "June 9, 1951" not in section
        assert "Lagos, Nigeria" in section and "Brussels, Belgium" in section
        assert section.count("flagged; policy=") == 2 and section.count("clean;") == 2


def test_serve_runs_several_worker_processes(tmp_path):
    import time

    import httpx
    import openai

    from tests.conftest import free_port

    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(f'port = {port}\napi_keys = "cli-key"\n')
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen([str(SCRIPT), "serve", "--config", str(config), "--workers", "2"], stdout=log,
                               stderr=subprocess.STDOUT, env=os.environ | {"UNLEARN_CONFIG": ""})
    try:
        # Each worker loads the targets on its own; one ready answer can come from the first worker while the
        # other is still starting, so wait for a run of them (the kernel spreads connections over the workers).
        deadline, ready_in_a_row = time.time() + 120, 0
        while time.time() < deadline and ready_in_a_row < 10:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                ready = False
            ready_in_a_row = ready_in_a_row + 1 if ready else 0
            time.sleep(0.05 if ready else 0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0)
        for _ in range(4):
            reply = client.chat.completions.create(model="demo", max_tokens=8, temperature=0,
                                                   messages=[{"role": "user", "content": "Hello"}])
            assert reply.choices[0].message.content
        text = (tmp_path / "serve.log").read_text()
        assert text.count("Started server process") >= 2 or text.count("Waiting for application startup") >= 2, text
    finally:
        process.terminate()
        process.wait(timeout=30)
