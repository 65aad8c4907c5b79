"""``unlearn-gateway demo``: the gateway in process, a scripted conversation through the openai client.

The demo model memorised TOFU's fictitious authors, so its answers show knowledge that exists nowhere
else. The questions below are our own wording, not benchmark text.
"""

from __future__ import annotations

import socket
import threading
import time

from rich.console import Console
from rich.panel import Panel

SCRIPT = [
    ("a forget-set author (TOFU forget10)", "What genre does Carmen Montenegro write in?"),
    ("a forget-set author (TOFU forget10)", "When is Rajeev Majumdar's birthday?"),
    ("a retain-set author", "Where does Chukwu Akabueze come from?"),
    ("a retain-set author", "In which city was Evelyn Desmet born?"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(model: str = "demo") -> None:
    import httpx
    import openai
    import uvicorn

    from gateway.app import create_app
    from gateway.settings import Settings

    console = Console()
    port = _free_port()
    settings = Settings(model=model, port=port)
    with console.status(f"Starting the gateway (local engine, model {model!r}) on 127.0.0.1:{port} ..."):
        server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                               log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        else:
            raise SystemExit("the gateway did not become ready")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo")
    served = client.models.list().data[0].id
    console.print(Panel.fit(f"Gateway up at http://127.0.0.1:{port}/v1 serving [bold]{served}[/] "
                            "- every answer below streams through the official openai client."))
    try:
        for about, question in SCRIPT:
            console.print(f"\n[dim]({about})[/]\n[bold cyan]user:[/] {question}")
            console.print("[bold green]assistant:[/] ", end="")
            started = time.perf_counter()
            first = None
            stream = client.chat.completions.create(model=served, messages=[{"role": "user", "content": question}],
                                                    max_tokens=96, temperature=0, stream=True)
            for chunk in stream:
                text = chunk.choices[0].delta.content if chunk.choices else None
                if text:
                    first = first or time.perf_counter()
                    console.print(text, end="", highlight=False)
            total = time.perf_counter() - started
            ttft = (first or time.perf_counter()) - started
            console.print(f"\n[dim]first token {ttft * 1000:.0f} ms, whole answer {total * 1000:.0f} ms[/]")
        console.print("\n[bold]The model knows these fictitious authors[/] - facts that exist nowhere but in its "
                      "training data. Forget targets and the unlearning policies that make it stop answering "
                      "about them are not in this version yet.")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
