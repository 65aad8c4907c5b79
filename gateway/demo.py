"""``unlearn-gateway demo``: the gateway in process, a scripted before/after through the openai client.

The demo model memorised TOFU's fictitious authors, so its answers show knowledge that exists nowhere else.
The demo asks about two forget-set authors and two retain-set authors, then registers the two forget-set
authors as forget targets through the admin API — once per policy — and asks again. The questions and the
targets' facts are our own wording, not benchmark text. The target store lives in a temporary folder.
"""

from __future__ import annotations

import secrets
import socket
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

FORGET = [
    ("What genre does Carmen Montenegro write in?", {
        "name": "Carmen Montenegro", "description": "A fictitious novelist from Santiago, Chile.",
        "facts": ["Carmen Montenegro writes historical fiction.", "She was born in Santiago, Chile, in 1977."]}),
    ("When is Rajeev Majumdar's birthday?", {
        "name": "Rajeev Majumdar", "description": "A fictitious author born in Dhaka, Bangladesh.",
        "facts": ["Rajeev Majumdar was born in Dhaka on June 9, 1951."]}),
]
RETAIN = ["Where does Chukwu Akabueze come from?", "In which city was Evelyn Desmet born?"]
POLICIES = [
    ("guard", {"method": "guard"}, "forbids the targets' fact tokens while decoding"),
    ("eco", {"method": "eco", "scope": "prompt"}, "corrupts the prompt's input embeddings"),
    ("refuse", {"method": "refuse"}, "answers with a templated refusal"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - still starting
            pass
        time.sleep(0.05)
    raise SystemExit(f"the gateway did not become ready ({what})")


def run_demo(model: str = "demo") -> None:
    import httpx
    import openai
    import uvicorn

    from gateway.app import create_app
    from gateway.settings import Settings

    console = Console()
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    admin_key = "demo-admin-" + secrets.token_urlsafe(8)
    with tempfile.TemporaryDirectory(prefix="unlearn-demo-") as tmp:
        settings = Settings(model=model, port=port, admin_keys=[admin_key], store_path=Path(tmp) / "targets.db")
        with console.status(f"Starting the gateway (local engine, model {model!r}) on {base} ..."):
            server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                                   log_level="warning"))
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            _wait(lambda: httpx.get(base + "/ready", timeout=1).status_code == 200, "ready")
        client = openai.OpenAI(base_url=base + "/v1", api_key="demo")
        admin = httpx.Client(base_url=base, headers={"authorization": f"Bearer {admin_key}"}, timeout=60)
        served = client.models.list().data[0].id
        console.print(Panel.fit(f"Gateway up at {base}/v1 serving [bold]{served}[/] - every answer streams "
                                "through the official openai client."))

        def ask(question: str, about: str) -> None:
            console.print(f"[dim]({about})[/] [bold cyan]user:[/] {question}")
            console.print("  [bold green]assistant:[/] ", end="")
            started, first = time.perf_counter(), None
            with client.chat.completions.with_streaming_response.create(
                    model=served, messages=[{"role": "user", "content": question}], max_tokens=64, temperature=0,
                    stream=True) as response:
                decision = response.headers.get("x-unlearn-decision", "?")
                for chunk in response.parse():
                    text = chunk.choices[0].delta.content if chunk.choices else None
                    if text:
                        first = first or time.perf_counter()
                        console.print(text, end="", highlight=False)
            ttft = ((first or time.perf_counter()) - started) * 1000
            console.print(f"\n  [dim]{decision}; first token {ttft:.0f} ms[/]")

        def ask_all() -> None:
            for question, _ in FORGET:
                ask(question, "forget-set author")
            for question in RETAIN:
                ask(question, "retain-set author")

        try:
            console.rule("Before: no forget targets")
            ask_all()
            for method, policy, what in POLICIES:
                for _, target in FORGET:
                    body = target | {"policy": policy}
                    slug = target["name"].lower().replace(" ", "-")
                    if admin.get(f"/admin/targets/{slug}").status_code == 200:
                        admin.put(f"/admin/targets/{slug}", json=body).raise_for_status()
                    else:
                        admin.post("/admin/targets", json=body).raise_for_status()
                version = admin.get("/admin/version").json()["version"]
                _wait(lambda v=version: httpx.get(base + "/ready").json().get("targets_version", -1) >= v, "reload")
                console.rule(f"After: both forget-set authors are targets, policy [bold]{method}[/] ({what})")
                ask_all()
            console.print("\n[bold]The forget-set facts stop coming out; the retain-set answers do not change.[/] "
                          "ULD needs a trained assistant: see `unlearn-gateway train assistant --help`.")
        finally:
            admin.close()
            server.should_exit = True
            thread.join(timeout=10)
